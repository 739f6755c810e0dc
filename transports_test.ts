// UDP echo (RFC 862) and its defences, and what is particular to Unix sockets.
// The stream tests that every transport shares run over TCP and Unix sockets in
// main_test.ts and faults_test.ts.
import { assert, assertEquals, assertLessOrEqual, assertMatch, assertThrows } from "@std/assert";
import { ReplyGuard } from "./udp_guard.ts";
import { serve } from "./main.ts";
import { denoSockets, type SocketsFactory } from "./server.ts";
import {
  deadline,
  delay,
  freePort,
  pattern,
  runScript,
  SELECTORS,
  serveForTest,
  ServerProcess,
  socketPath,
  testEachStyle,
  waitUntil,
} from "./testing/helpers.ts";

/** A UDP socket on a loopback address, closed by `using`. */
function udpSocket(hostname = "127.0.0.1", port = 0): Deno.DatagramConn & Disposable {
  const socket = Deno.listenDatagram({ transport: "udp", hostname, port });
  return Object.assign(socket, { [Symbol.dispose]: () => socket.close() });
}

/** The server's UDP address: the same port as its TCP one. */
function udpAddr(port: number): Deno.NetAddr {
  return { transport: "udp", hostname: "127.0.0.1", port };
}

/** Datagrams that arrive on `socket` within `ms`, counted (read into a buffer large enough). */
async function countReplies(socket: Deno.DatagramConn, ms: number): Promise<number> {
  const buffer = new Uint8Array(65_536);
  let count = 0;
  const end = performance.now() + ms;
  let receiving = socket.receive(buffer);
  for (;;) {
    const left = end - performance.now();
    if (left <= 0) break;
    let timer: ReturnType<typeof setTimeout> | undefined;
    const timeout = new Promise<undefined>((resolve) => {
      timer = setTimeout(() => resolve(undefined), left);
    });
    const got = await Promise.race([receiving, timeout]);
    clearTimeout(timer);
    if (!got) break;
    count++;
    receiving = socket.receive(buffer);
  }
  receiving.catch(() => {}); // Interrupted when the socket closes
  return count;
}

/** Runs main.ts or client.ts with UDP's unstable API. */
const UDP = { permissions: ["--allow-net=127.0.0.1", "--unstable-net"] };

testEachStyle(
  "UDP echoes datagrams of every size whole, an empty one as empty",
  async (variant) => {
    await using server = serveForTest({ ...variant, udp: true });
    using socket = udpSocket();
    for (const size of [0, 1, 5, 1472, 1473, 8192, 65_507]) {
      const datagram = pattern(size, size);
      await socket.send(datagram, udpAddr(server.port));
      const [echoed, from] = await deadline(socket.receive(), `the echo of ${size} bytes`);
      assertEquals(echoed, datagram, `${size} bytes`);
      assertEquals((from as Deno.NetAddr).port, server.port);
    }
    assertEquals(server.stats.datagrams, 7);
  },
);

testEachStyle(
  "deno run client.ts --udp gets twenty replies from main.ts --udp, and TCP still works on the same port",
  async (variant) => {
    await using server = await ServerProcess.start(["--port", "0", "--udp"], {
      ...UDP,
      ...variant,
    });
    const args = ["--port", `${server.port}`];
    const udp = await runScript("client.ts", [...args, "--udp"], UDP);
    assertEquals([udp.code, udp.stderr], [0, ""]);
    const lines = udp.stdout.trimEnd().split("\n");
    assertEquals(lines.slice(0, 20), Array(20).fill("reply from server= hello"));
    assertMatch(lines[20], /^20\/20 echoed in \d+ ms$/);
    const tcp = await runScript("client.ts", args, UDP);
    assertEquals([tcp.code, tcp.stderr], [0, ""]);
    const stopped = await server.stop("SIGTERM");
    assertEquals([stopped.code, stopped.stderr], [0, ""]);
  },
);

Deno.test("client.ts --udp sends a datagram again when no reply comes", async () => {
  // With a cap of 10 replies a second from one address, ten of the twenty senders
  // get no reply at first; each try waits 3000 / 3 ms, by when the cap has refilled.
  await using server = await ServerProcess.start(["--port", "0", "--udp", "--udp-rate", "10"], UDP);
  const args = ["--port", `${server.port}`, "--udp", "--timeout", "3000"];
  const retried = await runScript("client.ts", args, UDP);
  assertEquals([retried.code, retried.stderr], [0, ""]);
  assertMatch(retried.stdout, /^20\/20 echoed in \d+ ms$/m);
  await delay(1000); // a full bucket again
  const once = await runScript("client.ts", [...args, "--retries", "0", "--timeout", "500"], UDP);
  assertEquals(once.code, 1);
  assertEquals(once.stderr.match(/no reply from 127\.0\.0\.1:\d+ after 1 try$/gm)?.length, 10);
  assertMatch(once.stdout, /^10\/20 echoed in \d+ ms$/m);
  // Once a second the server logs how many it did not answer, and why.
  await waitUntil(
    () => server.count(/^udp: \d+ datagrams not answered \(over 10 replies\/s/) > 0,
    "the log of the datagrams not answered",
  );
  assertEquals((await server.stop("SIGTERM")).code, 0);
});

/**
 * Deno's own sockets, but the UDP socket's first receive fails with `error` (a
 * Linux UDP socket reports no ICMP errors, so a passing receive error needs a stand-in).
 */
function failingFirstReceive(error: Error): SocketsFactory {
  return (options) => {
    const sockets = denoSockets(options);
    return {
      ...sockets,
      listenDatagram(hostname, port) {
        const socket = sockets.listenDatagram(hostname, port) as Deno.DatagramConn;
        let failed = false;
        return {
          addr: socket.addr,
          receive: (buffer?: Uint8Array) =>
            failed ? socket.receive(buffer) : (failed = true, Promise.reject(error)),
          send: (datagram: Uint8Array, to: Deno.Addr) => socket.send(datagram, to),
          close: () => socket.close(),
        };
      },
    };
  };
}

testEachStyle(
  "a failed UDP receive is logged, and the next datagram is answered",
  async (variant) => {
    const errors: string[] = [];
    await using server = serveForTest({
      ...variant,
      udp: true,
      sockets: failingFirstReceive(new Error("No route to host")),
      log: { info() {}, error: (line) => errors.push(line) },
    });
    using client = udpSocket();
    await client.send(pattern(20), udpAddr(server.port));
    const [reply] = await deadline(client.receive(), "the echo after a failed receive");
    assertEquals(reply, pattern(20));
    assertEquals(errors, ["udp receive failed: No route to host"]);
  },
);

testEachStyle(
  "a UDP flood from one source gets at most the rate cap, while another source is still answered",
  async (variant) => {
    const rate = 50;
    await using server = serveForTest({ ...variant, udp: true, udpRate: rate });
    using flooder = udpSocket(); // never reads during the flood, as a spoofed victim would not
    using other = udpSocket("127.0.0.2"); // another source address on loopback
    const start = performance.now();
    // 3000 datagrams in bursts of 50, a millisecond apart: a flood sixty times the cap,
    // paced so that the kernel's receive buffer (about 270 such datagrams) does not overflow
    // even when the server runs slowly, as under coverage (the server counts each drop).
    for (let i = 0; i < 3000; i += 50) {
      const burst = Array.from({ length: 50 }, (_, j) => pattern(64, i + j));
      await Promise.all(burst.map((datagram) => flooder.send(datagram, udpAddr(server.port))));
      await delay(1);
    }
    await delay(50);
    const answered = [];
    for (let i = 0; i < 5; i++) {
      await other.send(pattern(8, i), udpAddr(server.port));
      answered.push(await deadline(other.receive(), "a reply to the other source"));
    }
    const replies = await countReplies(flooder, 300);
    const seconds = (performance.now() - start) / 1000;
    const cap = rate + rate * seconds; // the burst, then the rate
    assertLessOrEqual(replies, Math.ceil(cap) + 5, `${replies} replies in ${seconds} s`);
    assert(replies >= rate / 2, `only ${replies} replies: the burst was not answered`);
    assertEquals(answered.length, 5);
    assert(server.stats.dropped >= 3000 - replies - 100, `dropped ${server.stats.dropped}`);
  },
);

testEachStyle(
  "UDP survives garbage, floods and senders that vanish, and answers the next one",
  async (variant) => {
    await using server = serveForTest({ ...variant, udp: true, udpRate: 1_000_000 });
    const to = udpAddr(server.port);
    // Senders that send and vanish: their replies bounce as ICMP port unreachable.
    for (let i = 0; i < 50; i++) {
      using gone = udpSocket();
      await gone.send(pattern(100, i), to);
    }
    // Bursts of datagrams of random sizes and bytes, whose replies nobody reads.
    using flood = udpSocket();
    for (let i = 0; i < 2000; i++) {
      const size = (i * 7919) % 65_507;
      flood.send(pattern(size, i), to).catch(() => {});
    }
    await delay(200);
    using fresh = udpSocket();
    await fresh.send(new TextEncoder().encode("still there?"), to);
    const [reply] = await deadline(fresh.receive(), "a reply after the flood");
    assertEquals(new TextDecoder().decode(reply), "still there?");
  },
);

Deno.test("datagrams from the ports of UDP responders get no reply", async () => {
  const guard = new ReplyGuard({ rate: 1000 });
  for (const port of [0, 7, 19, 53, 123, 1900, 11211]) {
    assertEquals(guard.check({ transport: "udp", hostname: "127.0.0.1", port }), "reflector");
  }
  assertEquals(guard.check({ transport: "udp", hostname: "127.0.0.1", port: 40000 }), "reply");
  // End to end, where this process may bind a low port (root, or CAP_NET_BIND_SERVICE).
  let chargen: Deno.DatagramConn & Disposable;
  try {
    chargen = udpSocket("127.0.0.1", 19);
  } catch (error) {
    if (error instanceof Deno.errors.PermissionDenied || error instanceof Deno.errors.AddrInUse) {
      return; // checked through the guard above
    }
    throw error;
  }
  await using server = serveForTest({ udp: true });
  using normal = udpSocket();
  await chargen.send(pattern(10), udpAddr(server.port)); // a chargen "reply" aimed at us
  await normal.send(pattern(10), udpAddr(server.port));
  await deadline(normal.receive(), "the normal source's reply");
  assertEquals(await countReplies(chargen, 200), 0, "answered a chargen port: a loop");
  assertEquals([server.stats.datagrams, server.stats.dropped], [1, 1]);
  chargen.close();
});

Deno.test("--udp without --unstable-net is one line saying what to add, exit 2", async () => {
  for (const script of ["main.ts", "client.ts"]) {
    // Outside this repository: deno.json turns the unstable API on for everything run here.
    const { code, stdout, stderr } = await runScript(script, ["--udp"], { noConfig: true });
    assertEquals([code, stdout], [2, ""], script);
    assertEquals(
      stderr,
      `${script}: --udp needs Deno's unstable UDP API: add --unstable-net to deno run (the tasks have it, from deno.json)\n`,
    );
  }
});

/** Permissions for main.ts on a Unix socket, as its help says. */
function unixPermissions(path: string): string[] {
  return [`--allow-read=${path}`, `--allow-write=${path}`, `--allow-net=unix:${path}`];
}

testEachStyle(
  "a Unix socket's file is removed at shutdown; a stale one is replaced, and the log says so",
  async (variant) => {
    const path = socketPath();
    const permissions = unixPermissions(path);
    // A server that crashes leaves its socket file behind.
    const crashed = new Deno.Command("deno", {
      args: ["eval", `Deno.listen({ transport: "unix", path: "${path}" }); Deno.exit(0);`],
    });
    assertEquals((await crashed.output()).code, 0);
    assert(Deno.lstatSync(path).isSocket, "no stale socket file to test with");
    await using server = await ServerProcess.start(["--unix", path], { ...variant, permissions });
    assertMatch(
      server.stdout,
      new RegExp(`^removed the stale socket file ${path}: nothing was listening on it$`, "m"),
    );
    const client = await runScript("client.ts", ["--unix", path], { permissions });
    assertEquals([client.code, client.stderr], [0, ""]);
    assertEquals((await server.stop("SIGTERM")).code, 0);
    let left = true;
    try {
      Deno.lstatSync(path);
    } catch (error) {
      left = !(error instanceof Deno.errors.NotFound);
    }
    assert(!left, "the socket file outlived the server");
  },
);

Deno.test("a live server's socket, a regular file or a directory at --unix PATH: one line, exit 1, left untouched", async () => {
  const path = socketPath();
  const permissions = unixPermissions(path);
  await using live = await ServerProcess.start(["--unix", path], { permissions });
  const second = await runScript("main.ts", ["--unix", path], { permissions });
  assertEquals([second.code, second.stdout], [1, ""]);
  assertEquals(
    second.stderr,
    `main.ts: another server is listening on ${path}: stop it or choose another path with --unix\n`,
  );
  const client = await runScript("client.ts", ["--unix", path], { permissions });
  assertEquals(client.code, 0, "the live server stopped answering");
  assertEquals((await live.stop("SIGTERM")).code, 0);

  for (
    const [what, make] of [
      ["a regular file", () => Deno.writeTextFileSync(path, "precious")],
      ["a directory", () => Deno.mkdirSync(path)],
    ] as const
  ) {
    make();
    const { code, stdout, stderr } = await runScript("main.ts", ["--unix", path], { permissions });
    assertEquals([code, stdout], [1, ""], what);
    assertEquals(
      stderr,
      `main.ts: ${path} is ${what}: choose another path with --unix (it was left untouched)\n`,
    );
    const info = Deno.lstatSync(path);
    assert(what === "a directory" ? info.isDirectory : Deno.readTextFileSync(path) === "precious");
    Deno.removeSync(path);
  }
});

Deno.test("--unix without permission for the path: one line naming the three flags, exit 1", async () => {
  const path = socketPath();
  const flags = unixPermissions(path).join(" ");
  const server = await runScript("main.ts", ["--unix", path], { permissions: [] });
  assertEquals([server.code, server.stdout], [1, ""]);
  assertEquals(
    server.stderr,
    `main.ts: no permission to use the socket ${path}: run with ${flags}\n`,
  );
  // The client, too, needs all three, and says so once, not once per connection.
  await using live = await ServerProcess.start(["--unix", path], {
    permissions: unixPermissions(path),
  });
  const client = await runScript("client.ts", ["--unix", path], {
    permissions: [`--allow-net=unix:${path}`],
  });
  assertEquals([client.code, client.stdout], [1, ""]);
  assertEquals(
    client.stderr,
    `client.ts: no permission to connect to ${path}: run with ${flags}\n`,
  );
  assertEquals((await live.stop("SIGTERM")).code, 0);
});

Deno.test("--udp on a port whose UDP side is taken, or --unix in a missing directory: one line, exit 1", async () => {
  // A port whose TCP side is free (it was just ours) and whose UDP side is held.
  const port = freePort();
  using _held = udpSocket("127.0.0.1", port);
  const udp = await runScript("main.ts", ["--udp", "--port", `${port}`], UDP);
  assertEquals([udp.code, udp.stdout], [1, ""]);
  assertEquals(
    udp.stderr,
    `main.ts: port ${port} on 127.0.0.1 is already in use (for TCP or UDP): stop the other server or choose another port with --port\n`,
  );
  // serve() itself throws, and leaves the TCP port it had taken free again.
  assertThrows(() => serve({ port, udp: true, logLevel: "quiet" }), Deno.errors.AddrInUse);
  Deno.listen({ hostname: "127.0.0.1", port }).close();
  const path = `${socketPath()}.missing/echo.sock`;
  const directory = path.slice(0, path.lastIndexOf("/"));
  for (const selector of SELECTORS) {
    const permissions = unixPermissions(path);
    const unix = await runScript("main.ts", ["--unix", path], { permissions, selector });
    assertEquals([unix.code, unix.stdout], [1, ""], selector);
    assertEquals(
      unix.stderr,
      `main.ts: cannot listen on ${path}: the directory ${directory} does not exist (create it, or choose another path with --unix)\n`,
      selector,
    );
  }
});
