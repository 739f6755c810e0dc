// Faults and hostile peers: each test is one behaviour of README's "Limits and
// failure behaviour". Servers run in process where the test only needs the
// protocol, and as a separate process where it needs signals, logs or /proc.
import { assert, assertEquals, assertLessOrEqual, assertMatch } from "@std/assert";
import { getAvailablePort } from "@std/net";
import { serve, type Server } from "./main.ts";
import { runClients } from "./client.ts";
import {
  delay,
  pattern,
  processUsage,
  readAll,
  runScript,
  ServerProcess,
  writeAll,
} from "./testing/helpers.ts";

function connect(port: number): Promise<Deno.TcpConn> {
  return Deno.connect({ hostname: "127.0.0.1", port });
}

/** Polls `condition` every 20 ms for up to `ms`; returns whether it came true. */
async function eventually(condition: () => boolean, ms = 5000): Promise<boolean> {
  for (const end = performance.now() + ms; performance.now() < end; await delay(20)) {
    if (condition()) return true;
  }
  return condition();
}

/** Echoes one message on `conn` and checks it. */
async function roundTrip(conn: Deno.Conn, bytes: Uint8Array): Promise<void> {
  await writeAll(conn, bytes);
  assertEquals(await readAll(conn, bytes.length), bytes);
}

/**
 * Runs `code` in a separate Deno process, which exits without closing its
 * connections: the kernel then resets every one that has unread data, which
 * is how a peer that vanishes looks to the server (Deno cannot set SO_LINGER).
 */
async function vanishingPeers(code: string): Promise<void> {
  const { code: status, stderr } = await new Deno.Command("deno", {
    args: ["eval", code],
    env: { NO_COLOR: "1" },
  }).output();
  assertEquals(status, 0, new TextDecoder().decode(stderr));
}

Deno.test("a peer that writes without reading leaves the server's memory flat, then gets every byte", async () => {
  const server = await ServerProcess.start(["--port", "0"]);
  const conn = await connect(server.port);
  await roundTrip(conn, pattern(100_000)); // warm the server up
  const before = await processUsage(server.pid);
  // Push until the kernel buffers on both sides are full and the writes stall.
  const payload = pattern(64 << 20, 9);
  let sent = 0;
  const writing = (async () => {
    while (sent < payload.length) sent += await conn.write(payload.subarray(sent));
  })();
  let stalledAt = -1;
  await eventually(() => {
    const stalled = sent === stalledAt;
    stalledAt = sent;
    return stalled && sent > 0;
  }, 10_000);
  const during = await processUsage(server.pid);
  assert(sent >= 4 << 20, `only ${sent} bytes went out before the writes stalled`);
  assertLessOrEqual(during.rssKiB - before.rssKiB, 8 * 1024, "server memory grew with the input");
  // Now read: everything comes back, in order.
  const [echoed] = await Promise.all([readAll(conn, payload.length), writing]);
  assertEquals(echoed.length, payload.length);
  assertEquals(echoed, payload);
  conn.close();
  assertEquals((await server.stop("SIGTERM")).code, 0);
});

Deno.test("1,000 connections that sent one byte and went quiet do not hold up other clients", async () => {
  const server = serve({ port: 0, logLevel: "quiet" });
  const { port } = server.addr;
  const quiet = await Promise.all(Array.from({ length: 1000 }, () => connect(port)));
  await Promise.all(quiet.map((conn) => conn.write(new Uint8Array([1]))));
  assert(await eventually(() => server.stats.open === 1000));
  const results = await runClients({ port, count: 20 });
  assertEquals(results.filter((result) => !result.ok), []);
  for (const conn of quiet) conn.close();
  await server.close();
});

Deno.test("600 connections at full speed: every echo is exact and every client finishes", async () => {
  // More reads are ready at once than Deno serves per turn, so loop.ts holds new reads
  // now and then (see its Scheduler); the client checks every byte that comes back.
  const server = serve({ port: 0, logLevel: "quiet" });
  const args = ["--port", `${server.addr.port}`, "--count", "600", "--duration", "2"];
  const load = await runScript("client.ts", args);
  assertEquals(load.code, 0, load.stdout + load.stderr);
  assertMatch(load.stdout, /^600 connections, 5-byte messages, 2 s: \d+ round trips verified/);
  await server.close();
});

Deno.test("--idle-timeout closes connections that send nothing, and only those", async () => {
  const server = serve({ port: 0, logLevel: "quiet", idleTimeout: 300 });
  const { port } = server.addr;
  const idle = await connect(port);
  const busy = await connect(port);
  const closedAt = readAll(idle).then(() => performance.now()); // EOF when the server closes it
  const start = performance.now();
  for (let i = 0; i < 10; i++) { // 1 s of activity, every 100 ms
    await roundTrip(busy, new Uint8Array([i]));
    await delay(100);
  }
  const idleFor = (await closedAt) - start;
  assert(idleFor >= 300, `closed after ${idleFor} ms, before the 300 ms limit`);
  assertEquals(server.stats.open, 1);
  await roundTrip(busy, pattern(10)); // still served
  idle.close();
  busy.close();
  await server.close();
});

Deno.test("--max-conns: the next connection waits in the backlog and is served once one closes", async () => {
  const server: Server = serve({ port: 0, logLevel: "quiet", maxConns: 5 });
  const { port } = server.addr;
  const first = await Promise.all(Array.from({ length: 5 }, () => connect(port)));
  for (const conn of first) await roundTrip(conn, pattern(10));
  const waiting = await connect(port); // the kernel completes the handshake
  await writeAll(waiting, pattern(10, 1));
  const echo = readAll(waiting, 10);
  await delay(300);
  assertEquals(server.stats.open, 5);
  for (const conn of first) await roundTrip(conn, pattern(10, 2)); // the others are unaffected
  let served = false;
  echo.then(() => served = true);
  await delay(100);
  assert(!served, "the sixth connection was served while five were open");
  first[0].close();
  assertEquals(await echo, pattern(10, 1));
  for (const conn of [...first.slice(1), waiting]) conn.close();
  await server.close();
});

Deno.test("out of file descriptors: one log line, no busy loop, accepting again once some close", async () => {
  // Deno itself holds about 24 descriptors: 64 leaves room for about 40 connections.
  const server = await ServerProcess.start(["--port", "0"], { shell: "ulimit -n 64" });
  const held = [];
  for (let i = 0; i < 60; i++) held.push(await connect(server.port));
  assert(await eventually(() => /out of file descriptors/.test(server.stderr)));
  const before = await processUsage(server.pid);
  await delay(1000);
  const after = await processUsage(server.pid);
  assertLessOrEqual(after.cpuMs - before.cpuMs, 300, "the server spun while out of descriptors");
  for (const conn of held.splice(0, 30)) conn.close();
  const [result] = await runClients({ port: server.port, count: 1 });
  assert(result.ok, result.error);
  assert(await eventually(() => /accepting again/.test(server.stderr)));
  for (const conn of held) conn.close();
  const { code, stderr } = await server.stop("SIGTERM");
  assertEquals(code, 0);
  assertEquals(stderr.match(/out of file descriptors/g)?.length, 1, stderr);
});

Deno.test("hundreds of peers that reset mid-echo cost one log line each and disturb no one", async () => {
  const server = await ServerProcess.start(["--port", "0"]);
  const steady = await connect(server.port);
  await roundTrip(steady, pattern(1000));
  await vanishingPeers(`
    const conns = [];
    for (let i = 0; i < 300; i++) {
      const conn = await Deno.connect({ hostname: "127.0.0.1", port: ${server.port} });
      conn.write(new Uint8Array(200_000)).catch(() => {}); // the echo is never read
      conns.push(conn);
    }
    await new Promise((resolve) => setTimeout(resolve, 200));
    Deno.exit(0);`);
  await roundTrip(steady, pattern(500_000, 3));
  assert(await eventually(() => (server.stdout.match(/ closed/g)?.length ?? 0) >= 300));
  steady.close();
  const { code, stdout, stderr } = await server.stop("SIGTERM");
  assertEquals([code, stderr], [0, ""]);
  const closes = stdout.match(/^\S+ closed.*$/gm) ?? [];
  assertEquals(closes.length, 301);
  const peers = closes.map((line) => line.split(" ")[0]);
  assertEquals(new Set(peers).size, 301, "a connection was logged closed twice");
});

Deno.test("SIGTERM under load writes back every byte already read, then exits 0", async () => {
  const server = await ServerProcess.start(["--port", "0"]);
  const size = 256 * 1024;
  const clients = await Promise.all(Array.from({ length: 20 }, () => connect(server.port)));
  // Each client sends 256 KiB and reads nothing yet: the echo piles up in flight.
  await Promise.all(clients.map((conn, c) => writeAll(conn, pattern(size, c))));
  const signalled = performance.now();
  server.kill("SIGTERM");
  const results = await Promise.all(clients.map(async (conn, c) => {
    const echoed = await readAll(conn); // until the server's EOF
    await conn.closeWrite(); // the server waits for ours before it closes
    conn.close();
    return { port: (conn.localAddr as Deno.NetAddr).port, payload: pattern(size, c), echoed };
  }));
  const { code, stdout } = await server.stop();
  const took = performance.now() - signalled;
  assertEquals(code, 0);
  assertLessOrEqual(took, 5000 + 2000, "the shutdown outlasted the grace period");
  for (const { port, payload, echoed } of results) {
    const line = stdout.match(
      new RegExp(`^127\\.0\\.0\\.1:${port} closed, (\\d+) bytes echoed$`, "m"),
    );
    assert(line, `no clean close for port ${port}:\n${stdout}`);
    assertEquals(echoed.length, Number(line[1]), "the client got other than what the server read");
    assertEquals(echoed, payload.subarray(0, echoed.length));
  }
});

Deno.test("a second SIGTERM exits at once, without waiting for the grace period", async () => {
  const server = await ServerProcess.start(["--port", "0"]);
  const stubborn = await connect(server.port); // never closes: shutdown would wait for it
  await roundTrip(stubborn, pattern(10));
  const signalled = performance.now();
  server.kill("SIGTERM");
  await server.waitFor(/shutting down/);
  const { code } = await server.stop("SIGTERM");
  assertEquals(code, 143);
  assert(performance.now() - signalled < 4000, "the second signal did not cut the grace period");
  stubborn.close();
});

Deno.test("5,000 connect/echo/close cycles leave the server's descriptors where they started", async () => {
  const server = await ServerProcess.start(["--port", "0"]);
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
  await delay(200); // the server closes its side after our FIN
  const after = await processUsage(server.pid);
  assertEquals(after.fds, before.fds);
  assertEquals((await server.stop("SIGTERM")).code, 0);
});

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

Deno.test("binding beyond loopback is allowed, and the listening line says so", async () => {
  const port = getAvailablePort();
  const server = await ServerProcess.start(["--host", "0.0.0.0", "--port", `${port}`], {
    permissions: ["--allow-net=0.0.0.0"],
  });
  assertMatch(
    server.stdout,
    new RegExp(`^listening on 0\\.0\\.0\\.0:${port} \\(reachable from the network\\)$`, "m"),
  );
  assertEquals((await server.stop("SIGTERM")).code, 0);
});

Deno.test("peers that send and vanish, or close while the server writes, affect only themselves", async () => {
  const server = serve({ port: 0, logLevel: "quiet" });
  const { port } = server.addr;
  const steady = await connect(port);
  const streaming = (async () => {
    for (let i = 0; i < 20; i++) await roundTrip(steady, pattern(50_000, i));
  })();
  // Close while the server is still writing a large echo back.
  const closers = Array.from({ length: 50 }, async (_, i) => {
    const conn = await connect(port);
    await conn.write(pattern(300_000, i)).catch(() => {});
    await conn.read(new Uint8Array(100));
    conn.close();
  });
  await Promise.all([streaming, ...closers]);
  assert(await eventually(() => server.stats.open === 1));
  steady.close();
  await server.close();
});
