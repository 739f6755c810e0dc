// The lesson's first step beside the other two: the blocking server serves one
// connection at a time, so one quiet client holds every other up; the selector's
// styles do not let it.
import { assert, assertEquals, assertMatch, assertThrows } from "@std/assert";
import { serve, type Style } from "./main.ts";
import {
  connect,
  delay,
  readAll,
  roundTrip,
  runScript,
  SELECTORS,
  serveForTest,
  ServerProcess,
  writeAll,
} from "./testing/helpers.ts";

/** How long a held-up client waits before the test calls it held up. */
const HELD_UP_MS = 300;

/** Whether `hello` comes back on a new connection within HELD_UP_MS; the read goes on after. */
async function answeredSoon(port: number) {
  const conn = await connect(port);
  await writeAll(conn, new TextEncoder().encode("hello"));
  const echo = readAll(conn, 5);
  let timer: ReturnType<typeof setTimeout> | undefined;
  const late = new Promise<boolean>((resolve) => timer = setTimeout(resolve, HELD_UP_MS, false));
  const soon = await Promise.race([echo.then(() => true), late]);
  clearTimeout(timer);
  return { conn, soon, echo };
}

for (const selector of SELECTORS) {
  Deno.test(`one quiet client holds every other up in the blocking style, and nobody in the others [${selector}]`, async () => {
    const held: Record<Style, boolean> = { blocking: false, callbacks: false, async: false };
    for (const style of Object.keys(held) as Style[]) {
      await using server = serveForTest({ style, selector });
      const quiet = await connect(server.port); // connects, says nothing
      await delay(50); // the server has taken it
      const next = await answeredSoon(server.port);
      held[style] = !next.soon;
      quiet.close(); // it leaves: the next one is served at once
      assertEquals(new TextDecoder().decode(await next.echo), "hello", style);
      next.conn.close();
    }
    assertEquals(held, { blocking: true, callbacks: false, async: false });
  });

  Deno.test(`the blocking style passes the lesson's client: twenty connections, served one after another [${selector}]`, async () => {
    const variant = { style: "blocking" as const, selector };
    await using server = await ServerProcess.start(["--port", "0"], variant);
    const client = await runScript("client.ts", ["--port", `${server.port}`]);
    assertEquals([client.code, client.stderr], [0, ""]);
    assertMatch(client.stdout, /^20\/20 echoed in \d+ ms$/m);
    const { code, stdout } = await server.stop("SIGTERM");
    assertEquals(code, 0);
    assertMatch(stdout, /^served 20 connections \(at most 1 at once\)/m);
  });

  Deno.test(`at shutdown the blocking server finishes the connection it serves, or cuts it after the grace period [${selector}]`, async () => {
    await using server = serveForTest({ style: "blocking", selector, gracePeriod: 400 });
    const { port } = server;
    const served = await connect(port);
    await roundTrip(served, new TextEncoder().encode("first"));
    const waiting = await connect(port); // in the kernel's backlog: never accepted
    const closing = server.close();
    const tail = await readAll(served); // the server half-closes: EOF
    assertEquals(tail.length, 0);
    const started = performance.now();
    await closing; // the client never half-closes: cut after the grace period
    const took = performance.now() - started;
    assert(took >= 300 && took < 2000, `shut down after ${took} ms`);
    assertEquals([server.stats.accepted, server.stats.failed], [1, 1]);
    served.close();
    waiting.close();
  });
}

Deno.test("--style blocking with --udp is one line saying why not; serve() refuses it too", async () => {
  const { code, stderr } = await runScript("main.ts", ["--style", "blocking", "--udp"]);
  assertEquals(
    [code, stderr],
    [
      2,
      "main.ts: --style blocking waits on one connection at a time: not with --udp (--help lists the flags)\n",
    ],
  );
  assertThrows(() => serve({ port: 0, style: "blocking", udp: true }), TypeError, "not with udp");
});
