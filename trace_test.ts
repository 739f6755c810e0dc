// --trace: what the loop does, turn by turn, in both styles; bounded.
import { assert, assertEquals, assertMatch } from "@std/assert";
import { createTracer, formatTrace } from "./trace.ts";
import type { SelectorKey } from "./loop.ts";
import { delay, runScript, ServerProcess, testEachStyle, waitUntil } from "./testing/helpers.ts";

testEachStyle("--trace shows each select(), then what ran for each ready key", async (variant) => {
  await using server = await ServerProcess.start(["--port", "0", "--trace"], { ...variant });
  const client = await runScript("client.ts", ["--port", `${server.port}`]);
  assertEquals(client.code, 0, client.stderr);
  await waitUntil(() => server.count(/ closed, 5 bytes echoed$/) === 20, "20 clean closes");
  const lines = server.stdout.split("\n");
  const selects = lines.filter((line) => line.startsWith("select() → "));
  assert(
    selects.some((line) => /ready: listener 127\.0\.0\.1:\d+ READ/.test(line)),
    "no accept turn",
  );
  assert(selects.some((line) => /ready: .*conn 127\.0\.0\.1:\d+ READ/.test(line)), "no read turn");
  if (variant.style === "callbacks") {
    assertMatch(server.stdout, /^ {2}accept\(listener 127\.0\.0\.1:\d+, READ\)$/m);
    assertMatch(server.stdout, /^ {2}read\(conn 127\.0\.0\.1:\d+, READ\)$/m);
    assertMatch(server.stdout, /^ {2}flushed\(conn 127\.0\.0\.1:\d+, WRITE\)$/m);
  } else {
    assertMatch(
      server.stdout,
      /^ {4}→ accept\(\) on listener \S+ resumes: conn 127\.0\.0\.1:\d+$/m,
    );
    assertMatch(server.stdout, /^ {4}→ recv\(\) on conn \S+ resumes: 5 bytes$/m);
    assertMatch(server.stdout, /^ {4}→ recv\(\) on conn \S+ resumes: EOF$/m);
  }
  assertEquals((await server.stop("SIGTERM")).code, 0);
});

testEachStyle("without --trace nothing of the loop is printed", async (variant) => {
  await using server = await ServerProcess.start(["--port", "0"], { ...variant });
  const client = await runScript("client.ts", ["--port", `${server.port}`]);
  assertEquals(client.code, 0, client.stderr);
  await waitUntil(() => server.count(/ closed, 5 bytes echoed$/) === 20, "20 clean closes");
  assertEquals(server.stdout.match(/select\(\)|→/g), null);
});

Deno.test("the trace is bounded: past its lines per second it counts, then says how many", async () => {
  const lines: string[] = [];
  const trace = createTracer({ maxPerSecond: 10, write: (line) => lines.push(line) });
  for (let i = 0; i < 100; i++) trace({ step: "unthrottle" });
  assertEquals(lines.length, 10);
  await delay(1050);
  trace({ step: "unthrottle" });
  assertEquals(lines.slice(10), [
    "… 90 more trace lines in that second",
    "fairness: throttle over",
  ]);
});

Deno.test("trace lines name keys by their address and masks by name", () => {
  const listener = {
    resource: { addr: { transport: "tcp", hostname: "127.0.0.1", port: 8888 } },
    callback: function accept() {},
  } as unknown as SelectorKey;
  const conn = {
    resource: { remoteAddr: { transport: "tcp", hostname: "::1", port: 5000 } },
    queued: 70_000,
  } as unknown as SelectorKey;
  assertEquals(formatTrace({ step: "select", ready: [] }), "select() → nothing ready");
  assertEquals(
    formatTrace({ step: "select", ready: [[listener, 1], [conn, 3]] }),
    "select() → 2 ready: listener 127.0.0.1:8888 READ, conn [::1]:5000 READ|WRITE",
  );
  assertEquals(
    formatTrace({ step: "select", ready: Array(20).fill([conn, 1]) }),
    "select() → 20 ready: conn [::1]:5000 READ, conn [::1]:5000 READ, conn [::1]:5000 READ, … 17 more",
  );
  assertEquals(
    formatTrace({ step: "callback", key: listener, mask: 1 }),
    "  accept(listener 127.0.0.1:8888, READ)",
  );
  assertEquals(
    formatTrace({ step: "pause", key: conn }),
    "  conn [::1]:5000: 70000 bytes queued, reading paused",
  );
  assertEquals(
    formatTrace({ step: "wake", key: conn, call: "recv", result: null }),
    "    → recv() on conn [::1]:5000 resumes: EOF",
  );
  assertEquals(
    formatTrace({ step: "wake", key: listener, call: "accept", result: conn }),
    "    → accept() on listener 127.0.0.1:8888 resumes: conn [::1]:5000",
  );
  assertEquals(
    formatTrace({ step: "throttle", starving: 3 }),
    "fairness: new reads throttled until 3 starving reads are served",
  );
});
