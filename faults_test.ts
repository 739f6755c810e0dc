// Faults and hostile peers: each test is one row of README's "Limits and
// failure behaviour". Servers run in process where the test only needs the
// protocol, and as a separate process where it needs signals, logs or /proc.
import { assert, assertEquals, assertGreater, assertLessOrEqual, assertMatch } from "@std/assert";
import { getAvailablePort } from "@std/net";
import { runClients } from "./client.ts";
import { SAME_SIGNAL_MS } from "./cli.ts";
import {
  argsFor,
  connect,
  deadline,
  delay,
  pattern,
  processUsage,
  readAll,
  resetStorm,
  roundTrip,
  runScript,
  serveForTest,
  ServerProcess,
  testEachStyle,
  testEachTransport,
  untilListening,
  waitUntil,
  writeAll,
} from "./testing/helpers.ts";

/** Runs `fn` and returns how many milliseconds it took. */
async function timed(fn: () => Promise<unknown>): Promise<number> {
  const start = performance.now();
  await fn();
  return performance.now() - start;
}

testEachStyle(
  "a peer that writes without reading: the server queues at most 64 KiB and a read buffer, its memory stays flat, and the peer then gets every byte",
  async (variant) => {
    await using server = serveForTest({ ...variant });
    const conn = await connect(server.port);
    await roundTrip(conn, pattern(100_000)); // warm up
    const payload = pattern(64 << 20, 9);
    const before = await processUsage();
    // Push until the kernel buffers on both sides are full and the writes stall.
    let sent = 0;
    const writing = (async () => {
      while (sent < payload.length) sent += await conn.write(payload.subarray(sent));
    })();
    let maxQueued = 0;
    let stalledAt = -1;
    await waitUntil(() => {
      maxQueued = Math.max(maxQueued, server.stats.queued);
      const stalled = sent === stalledAt && sent > 0;
      stalledAt = sent;
      return stalled;
    }, "the peer's writes to stall");
    const during = await processUsage();
    assert(sent >= 4 << 20, `only ${sent} bytes went out before the writes stalled`);
    assert(server.stats.bytes < payload.length, "the server read everything without writing back");
    assertLessOrEqual(maxQueued, 64 * 1024 + 64 * 1024, "queued beyond the high-water mark");
    assertLessOrEqual(during.rssKiB - before.rssKiB, 8 * 1024, "memory grew with the input");
    // Now read: everything comes back, in order.
    const [echoed] = await Promise.all([readAll(conn, payload.length), writing]);
    assertEquals(echoed, payload);
    conn.close();
  },
);

testEachStyle(
  "idle connections cost about 8 KiB each and do not hold up other clients",
  async (variant) => {
    await using server = await ServerProcess.start(["--port", "0"], { ...variant });
    const quiet: Deno.Conn[] = [];
    const openQuiet = async (count: number) => {
      for (let i = 0; i < count; i++) {
        const conn = await connect(server.port);
        await conn.write(new Uint8Array([1])); // read once, then silent
        quiet.push(conn);
      }
      await waitUntil(
        () => server.count(/ connected$/) === quiet.length,
        "the server to accept them",
      );
      await delay(200);
    };
    try {
      // The first thousand grow the heap once; the next two thousand show the cost of each.
      await openQuiet(1000);
      const before = await processUsage(server.pid);
      await openQuiet(2000);
      const after = await processUsage(server.pid);
      const perConnection = (after.rssKiB - before.rssKiB) / 2000;
      assertLessOrEqual(perConnection, 12, `an idle connection costs ${perConnection} KiB`);
      const results = await runClients({ port: server.port, count: 20 });
      assertEquals(results.filter((result) => !result.ok), []);
      const slowest = Math.max(...results.map((result) => result.ms));
      assertLessOrEqual(slowest, 2000, `a client waited ${slowest} ms behind the idle connections`);
    } finally {
      for (const conn of quiet) conn.close();
    }
  },
);

testEachStyle(
  "600 connections at full speed: with the fairness plug-in every connection is served, without it some starve",
  async (variant) => {
    // More reads are ready at once than Deno serves per turn (its budget of 128, the
    // rest woken last-in first-out), so without fairness.ts some connections wait for
    // hundreds of milliseconds. Two servers, with and without the plug-in, run at the
    // same time, each under its own load, so that a noisy machine slows both alike;
    // both run at a lower priority, so that they, not the loads, are the bottleneck.
    // Here, over 3 s: with it Jain 0.955-0.986, without it 0.52-0.85 (0.69-0.81 with
    // the plug-in broken); the least-served connection got 0.45-0.71 of the mean
    // against 0.10-0.29.
    const serveAndLoad = async (fairness: "on" | "off") => {
      const port = getAvailablePort();
      await using server = ServerProcess.spawn(
        ["--port", `${port}`, "--quiet", "--fairness", fairness],
        { ...variant, shell: "renice -n 6 $$ >/dev/null" }, // the loads get more CPU: the servers saturate
      );
      await untilListening(port);
      const args = ["--port", `${port}`, "--count", "600", "--duration", "3", "--json"];
      const { code, stdout, stderr } = await runScript("bench/load.ts", args);
      assertEquals(code, 0, stdout + stderr + server.stderr);
      const { jain, worst, ms } = JSON.parse(stdout).summary;
      return { jain, worst, text: `Jain ${jain}, least served ${worst}, p99.9 ${ms.p999} ms` };
    };
    const [fair, unfair] = await Promise.all([serveAndLoad("on"), serveAndLoad("off")]);
    const both = `with the plug-in ${fair.text}; without ${unfair.text}`;
    assertGreater(fair.jain, 0.9, `unfair with the plug-in: ${both}`); // red with it broken
    if (unfair.jain < 0.9) { // the load saturated the server: some starved without the plug-in
      assertGreater(fair.jain - unfair.jain, 0.05, `the plug-in made no difference: ${both}`);
      assertGreater(fair.worst, unfair.worst, `the plug-in made no difference: ${both}`);
    } else { // the load generator, not only the server, was the bottleneck this time
      // (once in CI: with it 0.950, without it 0.903, a difference too small to judge)
      console.warn(`few starved even without the plug-in (${both}): its floor alone was checked`);
    }
  },
  ["deno"], // the plug-in is loop.ts's; epoll_test.ts shows why the epoll selector needs none
);

testEachStyle(
  "--idle-timeout closes connections that send nothing, or stop reading their echo, and only those",
  async (variant) => {
    // Made before any connection: under coverage this loop alone blocks the process for 0.4 s.
    const flood = pattern(16 << 20);
    await using server = serveForTest({ ...variant, idleTimeout: 400 });
    const { port } = server;
    const busy = await connect(port);
    // Warm up the server's paths first: a cold one (under coverage, say) can stall too.
    await roundTrip(busy, pattern(300_000));
    const idle = await connect(port);
    const deaf = await connect(port); // sends without reading, until the server stops reading it
    const start = performance.now();
    const closedAt = (conn: Deno.Conn, limit?: number) =>
      readAll(conn, limit).then(() => performance.now() - start);
    const idleClosed = closedAt(idle); // EOF when the server closes it
    // The deaf peer's writes fail once the server closes it (a reset: its input was unread).
    const deafClosed = writeAll(deaf, flood).then(
      () => Infinity,
      () => performance.now() - start,
    );
    for (let i = 0; i < 15; i++) { // 1.5 s of activity, every 100 ms
      await roundTrip(busy, new Uint8Array([i]));
      await delay(100);
    }
    for (const [name, closed] of [["idle", idleClosed], ["deaf", deafClosed]] as const) {
      const after = await deadline(closed, `the ${name} connection to be closed`, 1000);
      assert(after >= 400 && after < 1500, `the ${name} connection was closed after ${after} ms`);
    }
    assertEquals(server.stats.open, 1);
    await roundTrip(busy, pattern(10)); // still served
    for (const conn of [idle, busy, deaf]) conn.close();
  },
);

testEachStyle(
  "--max-conns: the next connection waits in the backlog and is served once one closes",
  async (variant) => {
    const logged: [string, Record<string, unknown> | undefined][] = [];
    const log = {
      info: (line: string, fields?: Record<string, unknown>) => logged.push([line, fields]),
      error() {},
    };
    await using server = serveForTest({ ...variant, maxConns: 5, logLevel: "info", log });
    const { port } = server;
    const first = await Promise.all(Array.from({ length: 5 }, () => connect(port)));
    for (const conn of first) await roundTrip(conn, pattern(10));
    const waiting = await connect(port); // the kernel completes the handshake
    await writeAll(waiting, pattern(10, 1));
    const echo = readAll(waiting, 10);
    let served = false;
    echo.then(() => served = true, () => {});
    await delay(300);
    assertEquals(server.stats.open, 5);
    for (const conn of first) await roundTrip(conn, pattern(10, 2)); // the others are unaffected
    assert(!served, "the sixth connection was served while five were open");
    assertEquals(
      logged.filter(([, fields]) => fields?.event === "full"),
      [["5 connections open: new ones wait until one closes", { event: "full", open: 5 }]],
    );
    first[0].close();
    const took = await timed(async () => assertEquals(await echo, pattern(10, 1)));
    assertLessOrEqual(took, 1000, `served ${took} ms after a place came free`);
    for (const conn of [...first.slice(1), waiting]) conn.close();
  },
);

testEachStyle(
  "out of file descriptors: one log line, no busy loop, accepting again once some close",
  async (variant) => {
    // Deno itself holds about 24 descriptors: 64 leaves room for about 40 connections.
    await using server = await ServerProcess.start(["--port", "0"], {
      shell: "ulimit -n 64",
      ...variant,
    });
    const held = [];
    for (let i = 0; i < 60; i++) held.push(await connect(server.port));
    await waitUntil(() => /out of file descriptors/.test(server.stderr), "the EMFILE log line");
    const before = await processUsage(server.pid);
    await delay(1000);
    const after = await processUsage(server.pid);
    assertLessOrEqual(after.cpuMs - before.cpuMs, 300, "the server spun while out of descriptors");
    for (const conn of held.splice(0, 30)) conn.close();
    const [result] = await runClients({ port: server.port, count: 1, timeout: 2000 });
    assert(result.ok, result.error);
    await waitUntil(() => /accepting again/.test(server.stderr), "the recovery log line");
    for (const conn of held) conn.close();
    const { code, stderr } = await server.stop("SIGTERM");
    assertEquals(code, 0);
    assertEquals(stderr.match(/out of file descriptors/g)?.length, 1, stderr);
  },
);

testEachStyle(
  "hundreds of peers that reset mid-echo cost one log line each and disturb no one",
  async (variant) => {
    await using server = await ServerProcess.start(["--port", "0"], { ...variant });
    const steady = await connect(server.port);
    await roundTrip(steady, pattern(1000));
    // While 300 peers send 200 KB each and vanish with their echo unread (the
    // server is writing to them when the resets arrive), one client streams.
    const [took] = await Promise.all([
      timed(async () => {
        for (let i = 0; i < 20; i++) await roundTrip(steady, pattern(50_000, i));
      }),
      resetStorm(server.port, Array(300).fill(200_000)),
    ]);
    assertLessOrEqual(took, 3000, `the steady client's 20 round trips took ${took} ms`);
    await waitUntil(
      () => (server.stdout.match(/ closed/g)?.length ?? 0) >= 300,
      "a close line for each reset peer",
    );
    const results = await runClients({ port: server.port, count: 20 });
    assertEquals(results.filter((result) => !result.ok), []);
    steady.close();
    const { code, stdout, stderr } = await server.stop("SIGTERM");
    assertEquals([code, stderr], [0, ""]);
    const closes = stdout.match(/^\S+ closed.*$/gm) ?? [];
    assertEquals(closes.length, 321);
    // Each peer closed as often as it connected (a reset frees its port at once: another
    // connection may reuse it).
    const tally = (lines: string[]) =>
      lines.map((line) => line.split(" ")[0]).reduce(
        (counts, peer) => counts.set(peer, (counts.get(peer) ?? 0) + 1),
        new Map<string, number>(),
      );
    const connects = tally(stdout.match(/^\S+ connected$/gm) ?? []);
    assertEquals(tally(closes), connects, "a connection was logged closed twice");
  },
);

testEachTransport(
  "SIGTERM under load writes back every byte already read, then exits 0",
  async (variant, transport) => {
    const { args, permissions } = argsFor(transport);
    await using server = await ServerProcess.start(args, { ...variant, permissions });
    const size = 256 * 1024;
    const clients = await Promise.all(Array.from({ length: 20 }, () => connect(server.target)));
    // Each client sends 256 KiB and reads nothing yet: the echo piles up in flight.
    await Promise.all(clients.map((conn, c) => writeAll(conn, pattern(size, c))));
    // Connections the server has not accepted yet are the kernel's, reset when it stops listening.
    await waitUntil(() => server.count(/ connected$/) === 20, "the server to accept all 20");
    const signalled = performance.now();
    server.kill("SIGTERM");
    const echoes = await Promise.all(clients.map(async (conn, c) => {
      const echoed = await readAll(conn); // until the server's EOF
      await conn.closeWrite(); // the server waits for ours before it closes
      conn.close();
      assertEquals(echoed, pattern(size, c).subarray(0, echoed.length), "not the bytes sent");
      return echoed.length;
    }));
    const { code, stdout } = await server.stop();
    const took = performance.now() - signalled;
    assertEquals(code, 0);
    assertLessOrEqual(took, 5000 + 2000, "the shutdown outlasted the grace period");
    // What each client got back is what the server logged it read (Unix socket
    // peers have no address to match a line by, so compare the sets of counts).
    const logged = [...stdout.matchAll(/^\S+ closed, (\d+) bytes echoed$/gm)].map((m) =>
      Number(m[1])
    );
    const sorted = (counts: number[]) => counts.toSorted((x, y) => x - y);
    assertEquals(sorted(logged), sorted(echoes), "the clients got other than what the server read");
  },
);

testEachStyle(
  "at shutdown, input is no longer echoed, and connections still open after the grace period are cut",
  async (variant) => {
    await using server = serveForTest({ ...variant, gracePeriod: 300 });
    const stubborn = await connect(server.port); // never closes its side
    await roundTrip(stubborn, pattern(10));
    const took = timed(() => deadline(server.close(), "the shutdown", 2000));
    assertEquals(await readAll(stubborn, Infinity, 1000), new Uint8Array(0), "no EOF at shutdown");
    await stubborn.write(pattern(100)); // after the signal: dropped, not echoed
    assertGreater(await took, 300, "cut before the grace period was over");
    assertEquals(server.stats.open, 0);
    stubborn.close();
  },
);

testEachStyle(
  "peers that reset while the server shuts down end in their error, and the shutdown does not wait for them",
  async (variant) => {
    await using server = serveForTest({ ...variant, gracePeriod: 10_000 });
    // Two peers that vanish, their echo unread: the kernel resets their connections (Deno's
    // own close() would send a FIN first). One sent a little, so the server has half-closed it
    // and waits for its EOF; the other sent more than the kernel buffers hold, so the server
    // still has bytes to write back to it. They vanish once the server is in that state.
    const full = waitUntil(
      () => server.stats.open === 2 && server.stats.queued > 0,
      "a full queue",
    );
    const vanishing = resetStorm(server.port, [1000, 16 << 20], full);
    await full;
    const closing = server.close();
    await vanishing;
    await deadline(closing, "the shutdown after the resets", 3000);
    assertEquals(server.stats.failed, 2, "both peers ended in an error");
  },
);

testEachStyle(
  "a second SIGTERM exits at once, without waiting for the grace period; the same one again within 200 ms does not",
  async (variant) => {
    await using server = await ServerProcess.start(["--port", "0"], { ...variant });
    const stubborn = await connect(server.port); // never closes: shutdown would wait for it
    await roundTrip(stubborn, pattern(10));
    server.kill("SIGTERM");
    await server.waitFor(/shutting down/);
    // Twice within SAME_SIGNAL_MS is one request (deno task forwards what a
    // terminal already sent the whole group): the server still drains.
    server.kill("SIGTERM");
    await new Promise((resolve) => setTimeout(resolve, SAME_SIGNAL_MS + 50));
    assertEquals(server.exited, false, "the repeat within SAME_SIGNAL_MS forced the exit");
    const signalled = performance.now();
    const { code } = await server.stop("SIGTERM");
    assertEquals(code, 143);
    const took = performance.now() - signalled;
    assertLessOrEqual(took, 2000, `the second signal took ${took} ms to end the server`);
    stubborn.close();
  },
);

testEachStyle(
  "5,000 connect/echo/close cycles leave the server's descriptors where they started",
  async (variant) => {
    await using server = await ServerProcess.start(["--port", "0"], { ...variant });
    const hello = new TextEncoder().encode("hello");
    const cycle = async () => {
      const conn = await connect(server.port);
      await roundTrip(conn, hello);
      conn.close();
    };
    await cycle();
    const before = await processUsage(server.pid);
    for (let worker = 0; worker < 10; worker++) {
      await Promise.all(Array.from({ length: 10 }, async () => {
        for (let i = 0; i < 50; i++) await cycle();
      }));
    }
    await waitUntil(() => server.count(/ closed, 5 bytes echoed$/) === 5001, "5,001 closes");
    const after = await processUsage(server.pid);
    assertEquals(after.fds, before.fds);
    assertEquals((await server.stop("SIGTERM")).code, 0);
  },
);

Deno.test("a host that does not resolve, or is not this machine's, is one line and exit 1", async () => {
  const all = { permissions: ["--allow-net"] };
  const unknown = await runScript("main.ts", ["--host", "no-such-host.invalid"], all);
  assertEquals([unknown.code, unknown.stdout], [1, ""]);
  assertEquals(
    unknown.stderr,
    `main.ts: cannot resolve host "no-such-host.invalid": check --host\n`,
  );
  const foreign = await runScript("main.ts", ["--host", "192.0.2.1"], all); // TEST-NET-1
  assertEquals([foreign.code, foreign.stdout], [1, ""]);
  assertEquals(
    foreign.stderr,
    "main.ts: cannot listen on 192.0.2.1: it is not an address of this machine (check --host)\n",
  );
});

Deno.test("without network permission: one line saying which flag to add, exit 1; the flag works, IPv6 too", async () => {
  const { code, stdout, stderr } = await runScript("main.ts", ["--port", "0"], { permissions: [] });
  assertEquals([code, stdout], [1, ""]);
  assertEquals(
    stderr,
    "main.ts: no permission to listen on 127.0.0.1:0: run with --allow-net=127.0.0.1 (deno task start does)\n",
  );
  // IPv6: Deno reads the address in brackets (--allow-net=::1 it refuses), and the fix works.
  const v6 = await runScript("main.ts", ["--host", "::1", "--port", "0"], { permissions: [] });
  assertEquals(
    [v6.code, v6.stderr],
    [1, "main.ts: no permission to listen on [::1]:0: run with --allow-net=[::1]\n"],
  );
  await using server = await ServerProcess.start(["--host", "::1", "--port", "0"], {
    permissions: ["--allow-net=[::1]"],
  });
  assertEquals((await server.stop("SIGTERM")).code, 0);
});

testEachStyle(
  "binding beyond loopback is allowed, and the listening line says so",
  async (variant) => {
    const port = getAvailablePort();
    await using server = await ServerProcess.start(["--host", "0.0.0.0", "--port", `${port}`], {
      permissions: ["--allow-net=0.0.0.0"],
      ...variant,
    });
    assertMatch(
      server.stdout,
      new RegExp(`^listening on 0\\.0\\.0\\.0:${port} \\(reachable from the network\\)$`, "m"),
    );
    assertEquals((await server.stop("SIGTERM")).code, 0);
  },
);
