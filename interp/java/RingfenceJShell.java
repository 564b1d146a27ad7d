// The Java side of Ringfence's `java` code-interpreter contexts: a JShell (the jdk.jshell API,
// JDK 17) driven by ringfence_kernel.py's _DriverKernel over the framing described there.
//
// Run as `java --add-opens java.base/java.lang=ALL-UNNAMED --add-opens java.base/java.util=ALL-UNNAMED
// RingfenceJShell.java <fd>`: requests arrive on stdin, replies leave on pipe <fd>; fds 1 and 2
// are the kernel's capture pipes, so System.out/System.err of cells (and of programs they
// start) become stdout/stderr messages without passing through here.
//
// Snippets run in this JVM (the "local" execution engine): JShell's default starts a second
// JVM and talks to it over a socket, which doubles the memory and the start-up time of every
// context. A cell is split into snippets with JShell's own completeness analysis and each is
// evaluated in order; the first that fails to compile or throws ends the cell. The value of
// the last expression snippet is the cell's result. An interrupt (SIGINT, sent by the kernel)
// stops the running snippet through JShell.stop(). Per-cell environment variables are written
// into the JVM's copy of the environment (System.getenv() cannot be changed otherwise; the
// --add-opens above allow it) and restored afterwards.

import java.io.ByteArrayOutputStream;
import java.io.DataInputStream;
import java.io.FileOutputStream;
import java.io.IOException;
import java.io.OutputStream;
import java.io.PrintStream;
import java.lang.reflect.Field;
import java.nio.charset.StandardCharsets;
import java.util.ArrayList;
import java.util.HashMap;
import java.util.List;
import java.util.Map;
import java.util.stream.Collectors;
import jdk.jshell.Diag;
import jdk.jshell.EvalException;
import jdk.jshell.JShell;
import jdk.jshell.Snippet;
import jdk.jshell.SnippetEvent;
import jdk.jshell.SourceCodeAnalysis;
import jdk.jshell.UnresolvedReferenceException;

public class RingfenceJShell {
    private static OutputStream ctl;

    public static void main(String[] args) throws Exception {
        // Java cannot wrap an inherited descriptor number, only reopen it by path: check that it
        // is the pipe it must be first (reopening a regular file would truncate it).
        java.nio.file.Path fd = java.nio.file.Path.of("/proc/self/fd/" + Integer.parseInt(args[0]));
        String target = java.nio.file.Files.readSymbolicLink(fd).toString();
        if (!target.startsWith("pipe:")) {
            System.err.println("ringfence: reply descriptor " + args[0] + " is " + target + ", not a pipe");
            System.exit(2);
        }
        ctl = new FileOutputStream(fd.toFile());
        DataInputStream in = new DataInputStream(System.in);
        JShell shell = JShell.builder()
                .executionEngine("local")
                .out(System.out)
                .err(System.err)
                .build();
        sun.misc.Signal.handle(new sun.misc.Signal("INT"), sig -> shell.stop());
        // Compile once now, so the first cell does not pay for javac's start.
        shell.eval("int $ringfenceWarm = 0;");
        reply("ready", "");
        while (true) {
            String header = readLine(in);
            if (header == null) {
                System.exit(0);
            }
            String[] parts = header.split(" ");
            byte[] body = new byte[Integer.parseInt(parts[1])];
            in.readFully(body);
            String text = new String(body, StandardCharsets.UTF_8);
            if (parts[0].equals("env")) {
                setEnv(text);
                reply("done", "");
            } else if (parts[0].equals("exec")) {
                run(shell, text);
                System.out.flush();
                System.err.flush();
                reply("done", "");
            }
        }
    }

    private static void run(JShell shell, String code) {
        SourceCodeAnalysis sca = shell.sourceCodeAnalysis();
        String rest = code;
        String lastValue = null;
        boolean lastWasExpression = false;
        while (!rest.isBlank()) {
            SourceCodeAnalysis.CompletionInfo info = sca.analyzeCompletion(rest);
            String source = info.source();
            if (source == null || info.completeness() == SourceCodeAnalysis.Completeness.DEFINITELY_INCOMPLETE) {
                source = rest; // let JShell report what is wrong with it
                rest = "";
            } else {
                rest = info.remaining();
            }
            List<SnippetEvent> events = shell.eval(source);
            for (SnippetEvent e : events) {
                if (e.causeSnippet() != null) {
                    continue; // an update of a dependent snippet, not this one's outcome
                }
                Snippet s = e.snippet();
                if (e.status() == Snippet.Status.REJECTED) {
                    String msg = shell.diagnostics(s)
                            .map(d -> d.getMessage(null))
                            .collect(Collectors.joining("\n"));
                    String where = shell.diagnostics(s)
                            .map(d -> pointer(s.source(), d))
                            .collect(Collectors.joining("\n"));
                    error("CompilationError", msg, where + msg);
                    return;
                }
                if (e.exception() != null) {
                    thrown(e.exception());
                    return;
                }
                lastWasExpression = s.kind() == Snippet.Kind.EXPRESSION
                        || (s.kind() == Snippet.Kind.VAR && s.subKind() == Snippet.SubKind.TEMP_VAR_EXPRESSION_SUBKIND);
                lastValue = e.value();
            }
        }
        if (lastWasExpression && lastValue != null) {
            reply("result", unquote(lastValue));
        }
    }

    /** A string value as its text, as E2B strips one level of quotes from results. */
    private static String unquote(String v) {
        if (v.length() >= 2 && v.startsWith("\"") && v.endsWith("\"")) {
            return v.substring(1, v.length() - 1);
        }
        return v;
    }

    private static String pointer(String source, Diag d) {
        long pos = Math.max(0, Math.min(d.getPosition(), source.length()));
        int start = source.lastIndexOf('\n', (int) pos - 1) + 1;
        int end = source.indexOf('\n', (int) pos);
        String line = source.substring(start, end < 0 ? source.length() : end);
        return line + "\n" + " ".repeat((int) pos - start) + "^\n";
    }

    private static void thrown(Exception ex) {
        String name;
        if (ex instanceof EvalException) {
            name = ((EvalException) ex).getExceptionClassName();
        } else if (ex instanceof UnresolvedReferenceException) {
            name = "UnresolvedReferenceException";
        } else {
            name = ex.getClass().getName();
        }
        String message = ex.getMessage() == null ? "" : ex.getMessage();
        ByteArrayOutputStream trace = new ByteArrayOutputStream();
        PrintStream ps = new PrintStream(trace, true, StandardCharsets.UTF_8);
        ps.println(name + (message.isEmpty() ? "" : ": " + message));
        for (StackTraceElement el : ex.getStackTrace()) {
            ps.println("\tat " + el);
        }
        if (name.equals("jdk.jshell.spi.ExecutionControl$StoppedException") || ex.getClass().getSimpleName().equals("StoppedException")) {
            name = "Interrupted";
        }
        error(name, message, trace.toString(StandardCharsets.UTF_8));
    }

    private static void error(String name, String value, String traceback) {
        reply("ename", name);
        reply("evalue", value);
        reply("etrace", traceback);
    }

    @SuppressWarnings("unchecked")
    private static void setEnv(String pairs) {
        Map<String, String> changes = new HashMap<>();
        List<String> removed = new ArrayList<>();
        for (String kv : pairs.split("\0")) {
            if (kv.isEmpty()) {
                continue;
            }
            int eq = kv.indexOf('=');
            if (eq < 0) {
                removed.add(kv);
            } else {
                changes.put(kv.substring(0, eq), kv.substring(eq + 1));
            }
        }
        try {
            Class<?> pe = Class.forName("java.lang.ProcessEnvironment");
            Field unmodField = pe.getDeclaredField("theUnmodifiableEnvironment");
            unmodField.setAccessible(true);
            Map<String, String> unmod = (Map<String, String>) unmodField.get(null);
            Field inner = unmod.getClass().getDeclaredField("m");
            inner.setAccessible(true);
            Map<String, String> env = (Map<String, String>) inner.get(unmod);
            env.putAll(changes);
            removed.forEach(env::remove);
        } catch (ReflectiveOperationException | RuntimeException e) {
            System.err.println("ringfence: per-cell environment variables are not available: " + e);
        }
    }

    private static String readLine(DataInputStream in) throws IOException {
        ByteArrayOutputStream b = new ByteArrayOutputStream();
        int c;
        while ((c = in.read()) != '\n') {
            if (c < 0) {
                return null;
            }
            b.write(c);
        }
        return b.toString(StandardCharsets.UTF_8);
    }

    private static void reply(String tag, String text) {
        byte[] body = text.getBytes(StandardCharsets.UTF_8);
        try {
            ctl.write((tag + " " + body.length + "\n").getBytes(StandardCharsets.UTF_8));
            ctl.write(body);
            ctl.flush();
        } catch (IOException e) {
            System.exit(1);
        }
    }
}
