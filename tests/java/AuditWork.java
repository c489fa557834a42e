// Statements for the statement audit through pgjdbc: java -cp postgresql.jar AuditWork.java URL
// URL must carry prepareThreshold=3. Runs, on one connection (extended protocol):
//   a plain Statement, a PreparedStatement executed 6 times (server-prepared from the third),
//   a batch of 3 inserts, a statement that fails (22012);
// and on a second connection with preferQueryMode=simple, a plain Statement (simple Query).
// Prints "OK" lines, "ERROR <sqlstate>" for the expected failure, then "DONE".
import java.sql.Connection;
import java.sql.DriverManager;
import java.sql.PreparedStatement;
import java.sql.ResultSet;
import java.sql.SQLException;
import java.sql.Statement;

public class AuditWork {
    public static void main(String[] args) throws Exception {
        String url = args[0];
        try (Connection conn = DriverManager.getConnection(url)) {
            try (Statement st = conn.createStatement()) {
                st.execute("select 1 /* jdbc-plain */");
                System.out.println("OK plain");
            }
            try (PreparedStatement ps = conn.prepareStatement("select v from t where id = ? /* jdbc-prepared */")) {
                for (int i = 0; i < 6; i++) {
                    ps.setInt(1, 1);
                    try (ResultSet rs = ps.executeQuery()) {
                        rs.next();
                    }
                }
                System.out.println("OK prepared");
            }
            try (PreparedStatement ps = conn.prepareStatement("insert into t (id, v) values (?, ?) /* jdbc-batch */")) {
                for (int i = 500; i < 503; i++) {
                    ps.setInt(1, i);
                    ps.setString(2, "b" + i);
                    ps.addBatch();
                }
                int[] counts = ps.executeBatch();
                System.out.println("OK batch " + counts.length);
            }
            try (Statement st = conn.createStatement()) {
                st.execute("select 1/0 /* jdbc-div */");
                System.out.println("NO ERROR");
            } catch (SQLException e) {
                System.out.println("ERROR " + e.getSQLState());
            }
        }
        try (Connection conn = DriverManager.getConnection(url + "&preferQueryMode=simple");
             Statement st = conn.createStatement()) {
            st.execute("select 2 /* jdbc-simple */");
            System.out.println("OK simple");
        }
        System.out.println("DONE");
    }
}
