// The client against servers that get the echo wrong: each way it can go wrong
// has its own one-line reason, and nothing waits longer than --timeout.
import { assertEquals } from "@std/assert";
import { getAvailablePort } from "@std/net";
import { deadline, readAll, runScript, socketPath, writeAll } from "./testing/helpers.ts";
import { runClients } from "./client.ts";

/** A TCP server that answers one connection with `answer(conn)`, then closes it. */
async function answerOnce(
  answer: (conn: Deno.Conn) => Promise<void>,
  client: (port: number) => Promise<unknown>,
) {
  using listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const serving = (async () => {
    using conn = await listener.accept();
    await answer(conn).catch(() => {}); // a client that gives up may reset the connection
  })();
  const result = await client(listener.addr.port);
  await deadline(serving, "the faulty server's one connection");
  return result;
}

const hello = new TextEncoder().encode("hello");

Deno.test("the client says when the echo is cut short, too long, or does not come in time", async () => {
  const cases: [string, (conn: Deno.Conn) => Promise<void>, string][] = [
    ["cut short", async (conn) => {
      await readAll(conn, 5);
      await writeAll(conn, hello.subarray(0, 2));
    }, "connection closed after 2 of 5 bytes"],
    ["too long", async (conn) => {
      await readAll(conn, 5);
      await writeAll(conn, new TextEncoder().encode("hellohello"));
      await readAll(conn); // until the client gives up
    }, "the server sent more bytes than were sent to it"],
    ["silent", async (conn) => {
      await readAll(conn); // reads, never answers, until the client gives up
    }, "no complete echo within 300 ms (0 of 5 bytes)"],
    ["stalled", async (conn) => {
      await readAll(conn, 5);
      await writeAll(conn, hello.subarray(0, 3));
      await readAll(conn);
    }, "no complete echo within 300 ms (3 of 5 bytes)"],
  ];
  for (const [what, answer, error] of cases) {
    const [result] = await answerOnce(
      answer,
      (port) => runClients({ port, count: 1, timeout: 300 }),
    ) as Awaited<ReturnType<typeof runClients>>;
    assertEquals([result.ok, result.error], [false, error], what);
  }
});

Deno.test("no server at a Unix socket path, or none answering UDP: one line says what to start", async () => {
  const path = socketPath("other.sock"); // nothing there
  const [missing] = await runClients({ unixPath: path, count: 1 });
  assertEquals([missing.error, missing.refused], [`no socket at ${path}`, true]);
  const unix = await runScript("client.ts", ["--unix", path], {
    permissions: [`--allow-read=${path}`, `--allow-write=${path}`, `--allow-net=unix:${path}`],
  });
  assertEquals([unix.code, unix.stdout], [1, ""]);
  assertEquals(
    unix.stderr,
    `client.ts: no server listens on ${path}: start one with: deno run --allow-read=${path} --allow-write=${path} --allow-net=unix:${path} main.ts --unix ${path}\n`,
  );
  const port = getAvailablePort();
  const udp = await runScript(
    "client.ts",
    ["--udp", "--port", `${port}`, "--timeout", "300", "--count", "2"],
    { permissions: ["--allow-net=127.0.0.1", "--unstable-net"] },
  );
  assertEquals([udp.code, udp.stdout], [1, ""]);
  assertEquals(
    udp.stderr,
    `client.ts: no UDP reply from 127.0.0.1:${port}: is the server running with --udp? Start it with: deno task start --udp --port ${port}\n`,
  );
});

Deno.test("a UDP reply of the wrong length or with a wrong byte, and a datagram too long to send", async () => {
  const server = Deno.listenDatagram({ transport: "udp", hostname: "127.0.0.1", port: 0 });
  try {
    const { port } = server.addr as Deno.NetAddr;
    const replies = [new TextEncoder().encode("hell"), new TextEncoder().encode("hellO")];
    const answering = (async () => {
      for (const reply of replies) {
        const [, from] = await server.receive();
        await server.send(reply, from);
      }
    })();
    const [short] = await runClients({ udp: true, port, count: 1 });
    assertEquals([short.ok, short.error], [false, "got 4 bytes back, not 5"]);
    const [wrong] = await runClients({ udp: true, port, count: 1 });
    assertEquals([wrong.ok, wrong.error], [false, "byte 4 differs: sent 111, got 79"]);
    await deadline(answering, "the two replies");
    // Over 65,507 bytes no UDP datagram can carry it: the error, not "no reply".
    const [tooLong] = await runClients({
      udp: true,
      port,
      count: 1,
      message: new Uint8Array(70_000),
    });
    assertEquals([tooLong.ok, tooLong.error], [false, "Error: Message too long (os error 90)"]);
  } finally {
    server.close();
  }
});
