// What the scripts report: JSON for scripts, a live line for people, a summary
// and JSON log lines for operators, OpenTelemetry counters for collectors.
import { assert, assertEquals, assertMatch } from "@std/assert";
import { getAvailablePort } from "@std/net";
import {
  concat,
  deadline,
  resetStorm,
  runScript,
  serveForTest,
  ServerProcess,
  testEachStyle,
  untilListening,
  waitUntil,
} from "./testing/helpers.ts";

/** The latency figures both reports give, in milliseconds, by the same names. */
const LATENCY_FIGURES = ["min", "p50", "p99", "p999", "max"];

Deno.test("client.ts --json prints one JSON document: each connection, and a summary", async () => {
  await using server = serveForTest();
  const args = ["--port", `${server.port}`, "--count", "5", "--json"];
  const { code, stdout, stderr } = await runScript("client.ts", args);
  assertEquals([code, stderr], [0, ""]);
  const report = JSON.parse(stdout); // nothing else on stdout
  assertEquals(report.schema, "echo-client/1");
  assertEquals(report.server, { host: "127.0.0.1", port: server.port, protocol: "tcp" });
  const { summary, results } = report;
  assertEquals([summary.count, summary.ok, summary.failed, summary.bytes], [5, 5, 0, 25]);
  assert(summary.elapsedMs > 0, stdout);
  assertEquals(Object.keys(summary.ms), LATENCY_FIGURES, "named as the load names them");
  const { min, p50, p99, p999, max } = summary.ms;
  assert(min <= p50 && p50 <= p99 && p99 <= p999 && p999 <= max, stdout);
  assertEquals(results.length, 5);
  assertEquals(results.map((result: { ok: boolean }) => result.ok), Array(5).fill(true));
  // No server: the JSON still comes, with the reason, and the one line on stderr.
  const refused = await runScript("client.ts", ["--port", "1", "--count", "2", "--json"]);
  assertEquals(refused.code, 1);
  assertMatch(refused.stderr, /^client\.ts: connection refused by 127\.0\.0\.1:1: /);
  const failed = JSON.parse(refused.stdout).summary;
  assertEquals([failed.ok, failed.failed], [0, 2]);
  assertMatch(failed.error, /connection refused/);
});

Deno.test("the load's --json prints its figures as one JSON document", async () => {
  await using server = serveForTest();
  const args = ["--port", `${server.port}`, "--duration", "0.5", "--count", "4", "--json"];
  const { code, stdout, stderr } = await runScript("bench/load.ts", args);
  assertEquals([code, stderr], [0, ""]);
  const figures = JSON.parse(stdout);
  assertEquals(figures.schema, "echo-load/1");
  assertEquals(figures.server, { host: "127.0.0.1", port: server.port, protocol: "tcp" });
  assertEquals(figures.load, { connections: 4, size: 5, seconds: 0.5 });
  const { summary } = figures;
  assertEquals(summary.failed, 0);
  assert(summary.roundTrips > 0 && summary.perSecond > 0 && summary.jain > 0.9, stdout);
  assertEquals(Object.keys(summary.ms), LATENCY_FIGURES, "named as the client names them");
  const { min, p50, p99, p999, max } = summary.ms;
  assert(0 < min && min <= p50 && p50 <= p99 && p99 <= p999 && p999 <= max, stdout);
  // No server: the JSON still comes, with the reason, and the one line on stderr.
  const refused = await runScript("bench/load.ts", ["--port", "1", "--duration", "0.5", "--json"]);
  assertEquals(refused.code, 1);
  assertMatch(refused.stderr, /^load\.ts: connection refused by 127\.0\.0\.1:1: /);
  const failed = JSON.parse(refused.stdout).summary;
  assertEquals([failed.roundTrips, failed.failed], [0, 20]);
  assertMatch(failed.error, /ConnectionRefused/);
});

/**
 * Runs a command under a pseudo-terminal (util-linux `script`), as a user at a
 * terminal would, with NO_COLOR unset (CI sets it) unless `noColor`.
 */
async function onTerminal(command: string, noColor = false): Promise<string> {
  const env = noColor ? "env NO_COLOR=1" : "env -u NO_COLOR";
  const { stdout } = await deadline(
    new Deno.Command("script", { args: ["-qc", `${env} ${command}`, "/dev/null"] }).output(),
    `script -qc ${command}`,
  );
  return new TextDecoder().decode(stdout);
}

Deno.test("the load shows a live progress line on a terminal that disappears at the end, and none otherwise", async () => {
  await using server = serveForTest();
  const load = `deno run --allow-net=127.0.0.1 bench/load.ts --port ${server.port} --duration 1`;
  const piped = await runScript("bench/load.ts", ["--port", `${server.port}`, "--duration", "0.5"]);
  assertEquals([piped.code, piped.stderr], [0, ""]); // not a terminal: no progress line
  const erase = "\r\x1b[K"; // back to the start of the line, and clear it
  const shown = (await onTerminal(load)).replaceAll(erase, "|");
  assertMatch(shown, /\|0\.\d of 1 s, \d+ round trips/);
  assertMatch(shown, /round trips\|20 connections, 5-byte messages/, "not cleared at the end");
  const noColor = await onTerminal(load, true);
  assertEquals(noColor.includes("\x1b[K"), false, "a progress line with NO_COLOR set");
});

testEachStyle("the server prints one summary line at shutdown", async (variant) => {
  await using server = await ServerProcess.start(["--port", "0"], { ...variant });
  const client = await runScript("client.ts", ["--port", `${server.port}`, "--count", "3"]);
  assertEquals(client.code, 0);
  await waitUntil(() => server.count(/ closed, 5 bytes echoed$/) === 3, "3 clean closes");
  await resetStorm(server.port, [1_000_000]); // and one peer that vanishes mid-transfer
  await waitUntil(() => server.count(/ closed after \d+ bytes: /) === 1, "the reset");
  const { code, stdout } = await server.stop("SIGTERM");
  assertEquals(code, 0);
  const last = stdout.trimEnd().split("\n").at(-1);
  assertMatch(
    last!,
    /^served 4 connections \(at most [1-3] at once\) in \d+\.\d s: \d+ bytes echoed; 1 connection ended in an error$/,
  );
});

testEachStyle(
  "--verbose also logs every echo; --quiet logs nothing but errors",
  async (variant) => {
    const args = ["--port", "0", "--verbose", "--udp"];
    await using verbose = await ServerProcess.start(args, { ...variant });
    const client = await runScript("client.ts", ["--port", `${verbose.port}`, "--count", "3"]);
    assertEquals(client.code, 0);
    const datagram = ["--port", `${verbose.port}`, "--count", "1", "--udp"];
    assertEquals((await runScript("client.ts", datagram)).code, 0);
    await waitUntil(
      () =>
        verbose.count(/^127\.0\.0\.1:\d+ echoing 5 bytes$/) === 3 &&
        verbose.count(/^udp 127\.0\.0\.1:\d+ echoing 5 bytes$/) === 1,
      "3 echoes and a datagram logged",
    );
    assertEquals((await verbose.stop("SIGTERM")).code, 0);

    const port = getAvailablePort();
    await using quiet = ServerProcess.spawn(["--port", `${port}`, "--quiet"], { ...variant });
    await untilListening(port);
    await resetStorm(port, [1_000_000]); // not an error of the server's: not logged either
    const quietClient = await runScript("client.ts", ["--port", `${port}`, "--count", "3"]);
    assertEquals(quietClient.code, 0);
    const { code, stdout, stderr } = await quiet.stop("SIGTERM");
    assertEquals([code, stdout, stderr], [0, "", ""]);
  },
);

Deno.test("--log-format json writes one JSON object per log line: timestamp, schema, and the line's fields", async () => {
  await using server = await ServerProcess.start(["--port", "0", "--log-format", "json"]);
  const client = await runScript("client.ts", ["--port", `${server.port}`, "--count", "2"]);
  assertEquals(client.code, 0);
  await waitUntil(() => server.count(/closed, 5 bytes echoed/) === 2, "2 clean closes");
  const { code, stdout } = await server.stop("SIGTERM");
  assertEquals(code, 0);
  const lines = stdout.trimEnd().split("\n").map((line) => JSON.parse(line));
  assertEquals(lines.length, 2 + 2 + 2 + 1); // listening, 2 connected, 2 closed, shutting down, summary
  for (const line of lines) {
    assertEquals(Object.keys(line).slice(0, 5), ["time", "level", "message", "schema", "event"]);
    assert(!Number.isNaN(Date.parse(line.time)), line.time);
    assertEquals([line.level, line.schema], ["info", "echo-log/1"]);
  }
  const events = lines.map((line) => line.event);
  assertEquals(events.toSorted(), [
    "closed",
    "closed",
    "connected",
    "connected",
    "listening",
    "stopping",
    "summary",
  ]);
  assertEquals(lines[0].port, server.port);
  const closed = lines.filter((line) => line.event === "closed");
  for (const line of closed) {
    assertMatch(line.peer, /^127\.0\.0\.1:\d+$/);
    assertEquals(line.bytes, 5);
    assert(Number.isInteger(line.durationMs) && line.durationMs >= 0, JSON.stringify(line));
  }
  assertEquals(lines.at(-1).stats.accepted, 2);
  assertEquals(lines.at(-1).stats.bytes, 10);
  assertMatch(lines[0].message, /^listening on 127\.0\.0\.1:\d+$/);
  const bad = await runScript("main.ts", ["--log-format", "xml"]);
  assertEquals(bad.code, 2);
  assertEquals(
    bad.stderr,
    `main.ts: --log-format must be text or json, got "xml" (--help lists the flags)\n`,
  );
});

Deno.test("--trace beside --log-format json: its lines are JSON lines too", async () => {
  const args = ["--port", "0", "--log-format", "json", "--trace"];
  await using server = await ServerProcess.start(args);
  const client = await runScript("client.ts", ["--port", `${server.port}`, "--count", "1"]);
  assertEquals(client.code, 0);
  const { code, stdout } = await server.stop("SIGTERM");
  assertEquals(code, 0);
  const lines = stdout.trimEnd().split("\n").map((line) => JSON.parse(line)); // each one parses
  const traced = lines.filter((line) => line.event === "trace");
  assert(traced.some((line) => /^select\(\) → /.test(line.message)), stdout);
  assert(traced.every((line) => line.schema === "echo-log/1"), stdout);
});

Deno.test("with OTEL_DENO=true the server exports its counters to a collector; without, it runs as before", async () => {
  // A collector on loopback that keeps what Deno sends it (OTLP over HTTP, protobuf).
  const received: Uint8Array[] = [];
  const collector = Deno.serve(
    { hostname: "127.0.0.1", port: 0, onListen() {} },
    async (request) => {
      received.push(new Uint8Array(await request.arrayBuffer()));
      return new Response(null, { status: 200 });
    },
  );
  try {
    const env = {
      OTEL_DENO: "true",
      OTEL_EXPORTER_OTLP_ENDPOINT: `http://127.0.0.1:${collector.addr.port}`,
      OTEL_METRIC_EXPORT_INTERVAL: "200",
    };
    await using server = await ServerProcess.start(["--port", "0", "--udp"], { env });
    const client = await runScript("client.ts", ["--port", `${server.port}`, "--count", "3"]);
    assertEquals(client.code, 0);
    const datagram = ["--port", `${server.port}`, "--count", "1", "--udp"];
    assertEquals((await runScript("client.ts", datagram)).code, 0);
    const exported = () => new TextDecoder().decode(concat(received));
    await waitUntil(
      () =>
        [
          // The semantic conventions' shape: names, units, attributes.
          "echo.server.accepted_connections",
          "echo.server.active_connections",
          "echo.server.connection.duration",
          "echo.server.io",
          "echo.server.datagrams",
          "{connection}",
          "{datagram}",
          "By",
          "network.transport",
          "network.type",
          "server.address",
          "server.port",
        ].every((name) => exported().includes(name)),
      "the counters at the collector",
    );
    assertEquals((await server.stop("SIGTERM")).code, 0);
  } finally {
    await collector.shutdown();
  }
});
