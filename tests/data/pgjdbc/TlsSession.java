// pgjdbc through Waypoint with sslmode=require (run by tests/test_e2e_clients.py as a
// single-file source program: java -cp postgresql.jar TlsSession.java URL).
// Prints: the session user, the length of a result spanning many TLS records, and the
// SQLSTATE of a denied INSERT.
import java.sql.Connection;
import java.sql.DriverManager;
import java.sql.ResultSet;
import java.sql.SQLException;
import java.sql.Statement;

public class TlsSession {
    public static void main(String[] args) throws Exception {
        try (Connection conn = DriverManager.getConnection(args[0])) {
            try (Statement st = conn.createStatement()) {
                ResultSet rs = st.executeQuery("select current_user, "
                    + "length(string_agg(md5(i::text), '')) from generate_series(1, 20000) i");
                rs.next();
                System.out.println(rs.getString(1));
                System.out.println(rs.getInt(2));
                try {
                    st.executeUpdate("insert into t values (53, 'x')");
                    System.out.println("inserted");
                } catch (SQLException e) {
                    System.out.println(e.getSQLState());
                }
            }
        }
    }
}
