// bench/loadgen, the load generator the figures in docs/ come from: it finds a
// wrong byte, counts a timeout, and measures every mode; and the C peer that
// `deno task bench` compares main.ts with. Needs Go to build it, and cc for the
// C peer (CI installs both); without them these tests are ignored.
import { assert, assertEquals, assertMatch } from "@std/assert";
import { getAvailablePort } from "@std/net";
import { SELECTORS, serveForTest, untilListening } from "../testing/helpers.ts";
import { buildCPeer, buildNative, type LoadgenOptions, runLoadgen } from "./native.ts";

const go = new Deno.Command("go", { args: ["version"], stdout: "null", stderr: "null" })
  .output().then((status) => status.success, () => false);
const ignore = !(await go);
const tools = ignore ? undefined : await buildNative();
const loadgen = tools && "loadgen" in tools ? tools.loadgen : "";
/** The C peer, built with cc; undefined without one. */
const cPeer = ignore ? undefined : await buildCPeer();

/** A short load: a tenth of a second to warm up, three tenths counted. */
function load(port: number, mode: LoadgenOptions["mode"], conns = 4): LoadgenOptions {
  return { port, mode, conns, size: 100, duration: 0.3, warmup: 0.1, timeout: 2 };
}

/** A server that echoes, but with every 50th byte changed: a checker must notice. */
function corruptingServer(): Deno.TcpListener {
  const listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  (async () => {
    for await (const conn of listener) {
      (async () => {
        const buffer = new Uint8Array(4096);
        try {
          for (let n, at = 0; (n = await conn.read(buffer)) !== null; at += n) {
            for (let i = 0; i < n; i++) if ((at + i) % 50 === 49) buffer[i] ^= 1;
            await conn.write(buffer.subarray(0, n));
          }
        } catch {
          // the load generator hangs up on the first wrong byte
        } finally {
          conn.close();
        }
      })();
    }
  })().catch(() => {}); // closed
  return listener;
}

Deno.test({
  name: "loadgen measures each mode against main.ts, every byte checked, with no failure",
  ignore,
  async fn() {
    await using server = serveForTest();
    for (const mode of ["rr", "bulk", "churn", "idle"] as const) {
      const { schema, summary } = await runLoadgen(loadgen, load(server.port, mode));
      assertEquals([schema, summary.failed], ["echo-loadgen/1", 0], mode);
      assert(summary.ops > 0 && summary.perSecond > 0 && summary.jain > 0, mode);
      if (mode !== "bulk") {
        const { min, p50, p99, p999, max } = summary.ms;
        assert(min! <= p50! && p50! <= p99! && p99! <= p999! && p999! <= max!, mode);
      }
      assertEquals(summary.serverCpuSeconds, undefined, "no CPU time unless asked");
    }
  },
});

Deno.test({
  name: "loadgen -server-pid reports the CPU time the server used while counting",
  ignore,
  async fn() {
    await using server = serveForTest(); // in this process
    const { summary } = await runLoadgen(loadgen, {
      ...load(server.port, "rr"),
      duration: 0.5,
      serverPid: Deno.pid,
    });
    // This process serves 4 busy connections: it is on the CPU much of the half second.
    assert(
      summary.serverCpuSeconds! >= 0.05 && summary.serverCpuSeconds! <= 1.5,
      `${summary.serverCpuSeconds}`,
    );
    const gone = new Deno.Command(loadgen, {
      args: ["-port", `${server.port}`, "-server-pid", "999999999"],
      stderr: "piped",
    });
    const { code, stderr } = await gone.output();
    assertEquals(code, 2);
    assertMatch(new TextDecoder().decode(stderr), /^loadgen: -server-pid 999999999: .*\n$/);
  },
});

Deno.test({
  name:
    "loadgen -mode hello, the lesson's Go client: twenty connections all get their echo, from the blocking server one at a time",
  ignore,
  async fn() {
    for (const selector of SELECTORS) {
      for (const style of ["blocking", "callbacks", "async"] as const) {
        await using server = serveForTest({ style, selector });
        const { summary } = await runLoadgen(loadgen, {
          port: server.port,
          mode: "hello",
          conns: 20,
          size: 5,
        });
        const variant = `${style} [${selector}]`;
        assertEquals([summary.ops, summary.failed, server.stats.accepted], [20, 0, 20], variant);
        if (style === "blocking") assertEquals(server.stats.peak, 1, variant);
      }
    }
  },
});

Deno.test({
  name: "loadgen finds a wrong byte, and counts a server that never answers as timeouts",
  ignore,
  async fn() {
    using corrupting = corruptingServer();
    const wrong = await runLoadgen(loadgen, load(corrupting.addr.port, "rr"));
    assertEquals(wrong.summary.failed, 4);
    assertMatch(wrong.summary.error ?? "", /wrong bytes echoed/);

    using silent = Deno.listen({ hostname: "127.0.0.1", port: 0 }); // accepts in the kernel only
    const options = { ...load(silent.addr.port, "rr", 2), timeout: 0.2 };
    const timedOut = await runLoadgen(loadgen, options);
    assertEquals([timedOut.summary.failed, timedOut.summary.timeouts], [2, 2]);
  },
});

Deno.test({
  name:
    "the C peer deno task bench measures against echoes every byte: round trips, bulk with partial writes, churn",
  ignore: !cPeer,
  async fn() {
    const port = getAvailablePort();
    const peer = new Deno.Command(cPeer!, { args: [`${port}`], stderr: "null" }).spawn();
    try {
      await untilListening(port);
      for (const mode of ["rr", "bulk", "churn"] as const) {
        const size = mode === "churn" ? 5 : 64 * 1024; // 64 KiB messages: some writes are partial
        const { summary } = await runLoadgen(loadgen, { ...load(port, mode, 8), size });
        assertEquals(summary.failed, 0, `${mode}: ${summary.error}`);
        assert(summary.ops > 0, mode);
      }
    } finally {
      peer.kill();
      await peer.status;
    }
  },
});
