// Runs console statements through pgjdbc: java -cp postgresql.jar ConsoleQuery.java URL SQL...
// Prints each row as tab-separated values, "OK <update count>" for a statement without rows,
// and "ERROR <sqlstate> <message>" for a failed statement (then goes on with the next).
import java.sql.Connection;
import java.sql.DriverManager;
import java.sql.ResultSet;
import java.sql.ResultSetMetaData;
import java.sql.SQLException;
import java.sql.Statement;

public class ConsoleQuery {
    public static void main(String[] args) throws Exception {
        try (Connection conn = DriverManager.getConnection(args[0])) {
            for (int i = 1; i < args.length; i++) {
                try (Statement st = conn.createStatement()) {
                    if (st.execute(args[i])) {
                        try (ResultSet rs = st.getResultSet()) {
                            ResultSetMetaData md = rs.getMetaData();
                            StringBuilder head = new StringBuilder("COLUMNS");
                            for (int c = 1; c <= md.getColumnCount(); c++) {
                                head.append('\t').append(md.getColumnName(c));
                            }
                            System.out.println(head);
                            while (rs.next()) {
                                StringBuilder row = new StringBuilder("ROW");
                                for (int c = 1; c <= md.getColumnCount(); c++) {
                                    row.append('\t').append(rs.getString(c));
                                }
                                System.out.println(row);
                            }
                        }
                    } else {
                        System.out.println("OK " + st.getUpdateCount());
                    }
                } catch (SQLException e) {
                    System.out.println("ERROR " + e.getSQLState() + " " + e.getMessage().replace('\n', ' '));
                }
            }
        } catch (SQLException e) {
            System.out.println("CONNECT-ERROR " + e.getSQLState() + " " + e.getMessage().replace('\n', ' '));
        }
    }
}
