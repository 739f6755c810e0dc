// The epoll selector alone: what the kernel's readiness gives (every ready socket in one
// turn), what it asks of the selector (partial writes, hang-ups, errno, descriptors closed
// once), and Deno's own loop kept running (timers, no CPU while idle).
import {
  assert,
  assertEquals,
  assertLess,
  assertLessOrEqual,
  assertRejects,
  assertThrows,
} from "@std/assert";
import { EpollSelector } from "./epoll.ts";
import { type ConnResource, READ, type SelectorKey, WRITE } from "./loop.ts";
import {
  connect,
  deadline,
  delay,
  pattern,
  processUsage,
  readAll,
  resetStorm,
  ServerProcess,
} from "./testing/helpers.ts";

const noop = () => {};
/** What a script run in a child process (`deno eval`) imports to make an epoll selector. */
const childImports = `
  import { EpollSelector } from "${new URL("./epoll.ts", import.meta.url)}";
  import { READ } from "${new URL("./loop.ts", import.meta.url)}";`;

/** An epoll selector listening on loopback, and the port. */
function listening(hostname = "127.0.0.1"): [EpollSelector, ConnResource[], number] {
  const selector = new EpollSelector();
  const listener = selector.listen({ hostname, port: 0 });
  const accepted: ConnResource[] = [];
  selector.register(listener, READ, (key) => accepted.push(key.accept()));
  return [selector, accepted, (listener.addr as Deno.NetAddr).port];
}

/** Selects until `count` connections are accepted; fails after 10 s. */
async function acceptAll(selector: EpollSelector, accepted: ConnResource[], count: number) {
  for (const end = performance.now() + 10_000; accepted.length < count;) {
    if (performance.now() > end) throw new Error(`accepted ${accepted.length} of ${count}`);
    for (const [key, mask] of await selector.select(100)) key.callback(key, mask);
  }
}

/** Selects until `key` is reported, and returns its mask; fails after 5 s. */
async function nextEvent(selector: EpollSelector, key: SelectorKey): Promise<number> {
  for (const end = performance.now() + 5000; performance.now() < end;) {
    for (const [ready, mask] of await selector.select(100)) if (ready === key) return mask;
  }
  throw new Error("the key was not reported ready within 5 s");
}

Deno.test("select() with a timeout waits about that long; 0, less, a fraction and NaN do not wait for ever; Infinity does", async () => {
  const [selector] = listening(); // a listener nobody connects to: nothing is ready
  for (const [timeout, least, most] of [[50, 40, 1000], [0, 0, 100], [-5, 0, 100], [0.5, 0, 100]]) {
    const start = performance.now();
    assertEquals(await deadline(selector.select(timeout), `select(${timeout})`, 2000), []);
    const took = performance.now() - start;
    assert(took >= least && took < most, `select(${timeout}) returned after ${took} ms`);
  }
  assertEquals(await deadline(selector.select(NaN), "select(NaN)", 100), []); // polls, as setTimeout
  const forever = selector.select(Infinity); // past epoll_wait's int: no limit, as none
  assertEquals(await Promise.race([forever, delay(100).then(() => "waits")]), "waits");
  selector.close();
  assertEquals(await deadline(forever, "select() to return after close()", 1000), []);
});

Deno.test("a busy selector's select(timeout) waits no longer than its timeout: the linger counts", async () => {
  const [selector, accepted, port] = listening();
  const peer = await connect(port);
  await acceptAll(selector, accepted, 1);
  const key = selector.register(accepted[0], READ, noop);
  const waits = [];
  for (let i = 0; i < 21; i++) {
    await peer.write(new Uint8Array([i]));
    await nextEvent(selector, key); // a turn with an event: the selector is busy
    key.recv();
    const start = performance.now();
    assertEquals(await selector.select(1), []); // and nothing more comes
    waits.push(performance.now() - start);
  }
  const median = waits.sort((a, b) => a - b)[10];
  assertLess(median, 4, `select(1) waited ${median.toFixed(1)} ms (the median of 21)`);
  peer.close();
  selector.close();
});

Deno.test("with 600 connections ready at once, one select() reports every one: no connection waits its turn", async () => {
  const [selector, accepted, port] = listening();
  const peers = await Promise.all(Array.from({ length: 600 }, () => connect(port)));
  await acceptAll(selector, accepted, 600);
  const keys = new Set<SelectorKey>(accepted.map((conn) => selector.register(conn, READ, noop)));
  await Promise.all(peers.map((peer) => peer.write(new Uint8Array([1]))));
  await delay(50); // every byte has arrived
  const ready = await selector.select(0);
  assertEquals(ready.filter(([key]) => keys.has(key)).length, 600);
  for (const peer of peers) peer.close();
  selector.close();
});

Deno.test("in a long turn run() lets the coroutines its callbacks woke run after every 32 callbacks, not only at its end", async () => {
  const [selector, accepted, port] = listening();
  const peers = await Promise.all(Array.from({ length: 100 }, () => connect(port)));
  await acceptAll(selector, accepted, 100);
  const log: string[] = [];
  let callbacks = 0;
  for (const conn of accepted) {
    selector.register(conn, READ, (key) => {
      key.recv();
      log.push("callback");
      queueMicrotask(() => log.push("woken")); // as a recv() promise resolved here would
      if (++callbacks === 100) selector.close(); // ends run()
    });
  }
  await Promise.all(peers.map((peer) => peer.write(new Uint8Array([1]))));
  await delay(50); // every byte has arrived: one turn reports all 100
  await selector.run();
  assertEquals(log.indexOf("woken"), 32);
  assertEquals(log.filter((entry) => entry === "woken").length, 100);
  for (const peer of peers) peer.close();
});

Deno.test("send() writes every byte of 16 MiB in order, finishing partial writes on EPOLLOUT; WRITE once all is written", async () => {
  const [selector, accepted, port] = listening();
  const peer = await connect(port);
  await acceptAll(selector, accepted, 1);
  const key = selector.register(accepted[0], WRITE, noop);
  const payload = pattern(16 << 20, 3);
  key.send(payload); // far more than the kernel takes at once: the rest is queued
  assert(key.queued > 0, "nothing was left for EPOLLOUT");
  const reading = readAll(peer, payload.length);
  let mask = 0;
  while (!(mask & WRITE)) mask = await nextEvent(selector, key);
  assertEquals(key.queued, 0);
  assertEquals(await reading, payload);
  peer.close();
  selector.close();
});

Deno.test("a peer that resets: the key is READ and WRITE ready, recv() throws ConnectionReset, then send() too", async () => {
  const [selector, accepted, port] = listening();
  // A process that connects, sends 10 bytes and exits 200 ms later without reading: the
  // kernel resets its connection, since the 100 kB sent to it are unread.
  const vanishing = resetStorm(port, [10]);
  await acceptAll(selector, accepted, 1);
  const key = selector.register(accepted[0], READ | WRITE, noop);
  key.send(pattern(100_000));
  await vanishing;
  let error: unknown;
  for (let turns = 0; turns < 100 && !error; turns++) {
    const mask = await nextEvent(selector, key);
    if (!(mask & READ)) continue;
    try {
      assert(key.recv() !== null, "EOF instead of a reset");
    } catch (thrown) {
      error = thrown;
      assertEquals(mask, READ | WRITE);
    }
  }
  assert(error instanceof Deno.errors.ConnectionReset, `not a reset: ${error}`);
  assertThrows(() => key.send(new Uint8Array(1)), Deno.errors.ConnectionReset);
  selector.close();
});

Deno.test("a peer that closes: recv() gives EOF, and EOF again", async () => {
  const [selector, accepted, port] = listening();
  const peer = await connect(port);
  await acceptAll(selector, accepted, 1);
  const key = selector.register(accepted[0], READ, noop);
  peer.close();
  for (let i = 0; i < 3; i++) { // EOF stays readable, as on a socket
    await nextEvent(selector, key);
    assertEquals(key.recv(), null);
  }
  selector.close();
});

Deno.test("a half-closed connection still takes writes; recv() gives EOF once the peer half-closes", async () => {
  const [selector, accepted, port] = listening("::1");
  const peer = await Deno.connect({ hostname: "::1", port });
  await acceptAll(selector, accepted, 1);
  const conn = accepted[0];
  assertEquals({ ...conn.remoteAddr }, { ...peer.localAddr }); // Deno's address has no prototype
  const key = selector.register(conn, READ, noop);
  await peer.write(pattern(10));
  await peer.closeWrite();
  const got: number[] = [];
  for (let data; (await nextEvent(selector, key)) && (data = key.recv()) !== null;) {
    got.push(...data);
  }
  assertEquals(new Uint8Array(got), pattern(10));
  key.send(pattern(5));
  await nextEvent(selector, selector.modify(conn, WRITE));
  await conn.closeWrite();
  assertEquals(await readAll(peer), pattern(5));
  peer.close();
  selector.close();
});

Deno.test("errno paths are Deno's errors: a port in use, an address not here, a name, a long path", () => {
  const selector = new EpollSelector();
  const taken = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  assertThrows(
    () => selector.listen({ hostname: "127.0.0.1", port: taken.addr.port }),
    Deno.errors.AddrInUse,
  );
  taken.close();
  assertThrows(
    () => selector.listen({ hostname: "192.0.2.1", port: 0 }),
    Deno.errors.AddrNotAvailable,
  );
  assertThrows(() => selector.listen({ hostname: "example.com", port: 0 }), TypeError, "numeric");
  assertThrows(() => selector.listenUnix(`/tmp/${"x".repeat(120)}`), TypeError, "107 bytes");
  using foreign = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  assertThrows(() => selector.register(foreign, READ, noop), TypeError, "not an open socket");
  selector.close();
});

Deno.test("every descriptor is closed once: after connections that reset, half-close and vanish, /proc/self/fd is back where it was", async () => {
  const before = (await processUsage()).fds;
  const [selector, accepted, port] = listening();
  const peers = await Promise.all(Array.from({ length: 50 }, () => connect(port)));
  await acceptAll(selector, accepted, 50);
  for (const conn of accepted.slice(0, 25)) selector.register(conn, READ, noop);
  for (const [i, peer] of peers.entries()) {
    if (i % 3 === 0) await peer.closeWrite();
    peer.close();
  }
  accepted[30].close();
  accepted[30].close(); // a second close does nothing: the descriptor may be someone else's now
  await delay(50);
  selector.close(); // closes the registered ones and the listener
  for (const conn of accepted.slice(25)) conn.close(); // the rest are ours to close
  assertEquals((await processUsage()).fds, before);
});

Deno.test("out of descriptors, a new selector throws EMFILE and leaves none of its own open", async () => {
  const code = `${childImports}
    const count = () => [...Deno.readDirSync("/proc/self/fd")].length;
    new EpollSelector().close(); // what Deno loads once is loaded
    const start = count();
    const files = [];
    try { for (;;) files.push(Deno.openSync("/dev/null")); } catch { /* none left */ }
    const errors = [];
    for (let free = 1; free <= 2; free++) { // a selector takes three
      files.pop().close();
      try { new EpollSelector(); errors.push("none"); } catch (e) { errors.push(e.message); }
    }
    for (const file of files) file.close();
    console.log(JSON.stringify({ errors, leaked: count() - start }));`;
  const { stdout, stderr } = await new Deno.Command("sh", {
    args: ["-c", 'ulimit -n 64 && exec deno eval -A "$0"', code],
    stdout: "piped",
    stderr: "piped",
  }).output();
  const output = new TextDecoder().decode(stdout);
  assert(output, new TextDecoder().decode(stderr));
  const emfile = "Too many open files (os error 24)";
  assertEquals(JSON.parse(output), { errors: [emfile, emfile], leaked: 0 });
});

Deno.test("Deno's own loop runs while the selector is busy: timers fire within milliseconds", async () => {
  const selector = new EpollSelector();
  const socket = selector.listenDatagram({ hostname: "127.0.0.1", port: 0 });
  let datagrams = 0;
  selector.register(socket, READ, (key) => key.recvfrom() && datagrams++);
  const running = selector.run();
  // Another process floods the socket for 1.5 s: it is ready at every turn.
  const flood =
    `const s = Deno.listenDatagram({ transport: "udp", hostname: "127.0.0.1", port: 0 });
    const to = { transport: "udp", hostname: "127.0.0.1", port: ${
      (socket.addr as Deno.NetAddr).port
    } };
    for (const end = Date.now() + 1500; Date.now() < end;) await s.send(new Uint8Array(8), to);`;
  const flooding = new Deno.Command("deno", { args: ["eval", "--unstable-net", flood] }).output();
  const lateness = [];
  for (const ms of [700, 1, 1, 1, 1]) { // the first waits until the flood runs
    const start = performance.now();
    await delay(ms);
    lateness.push(performance.now() - start - ms);
  }
  await flooding;
  selector.close();
  await running;
  assert(datagrams > 1000, `only ${datagrams} datagrams: no flood`);
  assertLessOrEqual(Math.max(...lateness), 50, `timers ran late by ${lateness.map(Math.round)} ms`);
});

Deno.test("when traffic stops, the selector lets Deno's loop run again: a timer set while busy fires", async () => {
  // In a child: a selector stuck on the JS thread would freeze this test's own timers too.
  const code = `${childImports}
    const selector = new EpollSelector();
    const socket = selector.listenDatagram({ hostname: "127.0.0.1", port: 0 });
    let timer;
    selector.register(socket, READ, (key) => {
      key.recvfrom();
      clearTimeout(timer);
      timer = setTimeout(() => console.log("fired"), 100); // 100 ms after the last datagram
    });
    console.log(socket.addr.port);
    await selector.run();`;
  const child = new Deno.Command("deno", {
    args: ["eval", "--unstable-net", code],
    stdout: "piped",
  })
    .spawn();
  const lines = child.stdout.pipeThrough(new TextDecoderStream()).getReader();
  try {
    const { value } = await deadline(lines.read(), "the selector to start");
    const sender = Deno.listenDatagram({ transport: "udp", hostname: "127.0.0.1", port: 0 });
    const to = { transport: "udp" as const, hostname: "127.0.0.1", port: Number(value) };
    for (let i = 0; i < 200; i++) await sender.send(new Uint8Array(8), to); // busy, then nothing
    sender.close();
    const { value: fired } = await deadline(lines.read(), "a timer after the traffic", 3000);
    assertEquals(fired?.trim(), "fired");
  } finally {
    child.kill("SIGKILL");
    await child.status;
    await lines.cancel();
  }
});

Deno.test("once idle, after a busy spell, the selector waits in the kernel: no CPU used", async () => {
  const code = `${childImports}
    const selector = new EpollSelector();
    const listener = selector.listen({ hostname: "127.0.0.1", port: 0 });
    selector.register(listener, READ, (key) => {
      selector.register(key.accept(), READ, (conn) => conn.send(conn.recv() ?? new Uint8Array()));
    });
    console.log(listener.addr.port);
    await selector.run();`;
  const child = new Deno.Command("deno", { args: ["eval", code], stdout: "piped" }).spawn();
  const reader = child.stdout.getReader();
  const { value } = await deadline(reader.read(), "the idle selector to start");
  const peer = await connect(Number(new TextDecoder().decode(value)));
  for (let i = 0; i < 200; i++) { // busy: each echo is the next turn's event
    await peer.write(new Uint8Array([i]));
    assertEquals(await readAll(peer, 1), new Uint8Array([i]));
  }
  await delay(200); // then idle, the connection open
  const before = await processUsage(child.pid);
  await delay(2000);
  const after = await processUsage(child.pid);
  child.kill("SIGKILL");
  await child.status;
  peer.close();
  reader.releaseLock();
  await child.stdout.cancel();
  const used = after.cpuMs - before.cpuMs;
  assertLessOrEqual(used, 30, `${used} ms of CPU used in two seconds of idling`);
});

Deno.test("close() ends a run() that waits, and the selector refuses new work", async () => {
  const [selector] = listening();
  const running = selector.run();
  await delay(20);
  selector.close();
  await deadline(running, "run() after close()", 1000);
  assertThrows(() => selector.listen({ hostname: "127.0.0.1", port: 0 }), Error, "closed");
  assertEquals(await selector.select(0), []);
});

Deno.test("misuse gets an error at once: registered twice, unknown, wrong kind, two selects, bad water marks, after close", async () => {
  assertThrows(() => new EpollSelector({ highWaterMark: 10, lowWaterMark: 20 }), RangeError);
  const selector = new EpollSelector();
  const listener = selector.listen({ hostname: "127.0.0.1", port: 0 });
  const socket = selector.listenDatagram({ hostname: "127.0.0.1", port: 0 });
  assertThrows(() => selector.listenDatagram({ hostname: "example.com", port: 0 }), TypeError);
  const key = selector.register(listener, READ, noop, "data");
  assertEquals([selector.size, selector.getKey(listener), key.data], [1, key, "data"]);
  assertThrows(() => selector.register(listener, READ, noop), Error, "already registered");
  assertThrows(() => selector.register(listener, WRITE, noop), Error);
  assertThrows(() => selector.modify(listener, WRITE), RangeError, "listener takes READ");
  assertEquals(selector.modify(listener, READ, noop, "more").data, "more");
  assertThrows(() => selector.modify(socket, READ), Error, "not registered");
  assertThrows(() => selector.unregister(socket), Error, "not registered");
  assertThrows(() => key.accept(), Deno.errors.WouldBlock);
  assertEquals(key.queued, 0);
  for (const call of [() => key.recv(), () => key.send(new Uint8Array(1))]) {
    assertThrows(call, TypeError, "connection's key");
  }
  const datagrams = selector.register(socket, READ, noop);
  assertThrows(() => datagrams.recvfrom(), Deno.errors.WouldBlock);
  assertThrows(() => datagrams.accept(), TypeError, "listener's key");
  const to = { transport: "udp", hostname: "127.0.0.1", port: 9 } as const;
  selector.unregister(socket);
  assertThrows(() => datagrams.sendto(new Uint8Array(1), to), Deno.errors.BadResource);
  socket.close();
  for (const call of [() => key.recvfrom(), () => key.sendto(new Uint8Array(1), to)]) {
    assertThrows(call, TypeError, "datagram socket's key");
  }
  const waiting = selector.select(50);
  await assertRejects(() => selector.select(0), Error, "another select()");
  await assertRejects(() => selector.run(), Error, "another select()");
  await waiting;
  selector.close();
  selector.close(); // a second close does nothing
  assertThrows(() => selector.register(listener, READ, noop), Error, "closed");
});

Deno.test("SIGTERM reaches an epoll server that a flood keeps busy: it shuts down within a second", async () => {
  // At a lower priority than two flooders, the server never runs out of datagrams to read.
  await using server = await ServerProcess.start(["--port", "0", "--udp"], {
    selector: "epoll",
    shell: "renice -n 10 $$ >/dev/null",
  });
  const flood =
    `const s = Deno.listenDatagram({ transport: "udp", hostname: "127.0.0.1", port: 0 });
    const to = { transport: "udp", hostname: "127.0.0.1", port: ${server.port} };
    for (const end = Date.now() + 3000; Date.now() < end;) await s.send(new Uint8Array(8), to);`;
  const flooding = Array.from(
    { length: 2 },
    () => new Deno.Command("deno", { args: ["eval", "--unstable-net", flood] }).output(),
  );
  await delay(800); // the flood runs
  const start = performance.now();
  const { code } = await server.stop("SIGTERM", 5000);
  const took = performance.now() - start;
  await Promise.all(flooding);
  assertEquals(code, 0);
  assertLessOrEqual(took, 1000, `the shutdown took ${Math.round(took)} ms under the flood`);
});
