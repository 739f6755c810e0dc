// The coroutine layer alone: each pitfall of putting promises on a readiness
// loop, checked so that it can fail.
import { assert, assertEquals, assertLessOrEqual, assertMatch, assertRejects } from "@std/assert";
import { AsyncLoop, type Connection, type WakeEvent } from "./async_loop.ts";
import { formatTrace } from "./trace.ts";
import { READ, Selector, type SelectorKey, type TraceEvent } from "./loop.ts";
import {
  connect,
  connectedPair,
  deadline,
  delay,
  echo,
  pattern,
  readAll,
  roundTrip,
} from "./testing/helpers.ts";

/** Runs `loop` until the end of the scope (`await using`), even when the test fails. */
function running(loop: AsyncLoop): AsyncDisposable {
  const run = loop.run();
  return {
    async [Symbol.asyncDispose]() {
      loop.stop();
      await deadline(run, "run() to end after stop()");
    },
  };
}

/**
 * An echo server on coroutines. With `pause`, each coroutine awaits a timer
 * between recv() and send(), as a handler that does other work would.
 */
function echoServer(loop = new AsyncLoop(), pause = false) {
  const listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  async function handle(conn: Connection) {
    for (let data; (data = await loop.recv(conn)) !== null;) {
      if (pause) await delay(0);
      await loop.send(conn, data);
    }
    await loop.close(conn);
  }
  loop.spawn((async () => {
    for (;;) loop.spawn(handle(await loop.accept(listener)));
  })());
  return Object.assign(running(loop), { loop, port: listener.addr.port });
}

Deno.test("coroutines echo 4 MiB exactly: the bytes recv() gives stay valid until the next recv()", async () => {
  // recv() hands out the read buffer itself: had a read started before the
  // coroutine sent those bytes, Deno could have refilled the buffer under them.
  for (const pause of [false, true]) {
    await using server = echoServer(new AsyncLoop(), pause);
    const payload = pattern(4 << 20, 5);
    const echoed = await echo(server.port, payload);
    assertEquals(echoed.length, payload.length);
    assertEquals(echoed, payload, pause ? "with an await before send()" : "");
  }
});

Deno.test("bytes kept across an await are not overwritten by the next read", async () => {
  const loop = new AsyncLoop();
  const [ours, peer] = await connectedPair();
  const conn = loop.adopt(ours);
  await using _ = running(loop);
  await peer.write(new TextEncoder().encode("first"));
  const first = await deadline(loop.recv(conn), "the first message");
  await peer.write(new TextEncoder().encode("second"));
  await delay(50); // the second message is there; no read may start before recv()
  assertEquals(new TextDecoder().decode(first!), "first");
  assertEquals(
    new TextDecoder().decode((await deadline(loop.recv(conn), "the second"))!),
    "second",
  );
  peer.close();
});

Deno.test("a ready connection nobody waits on does not make the loop turn, and keeps its bytes", async () => {
  let turns = 0;
  const trace = (event: TraceEvent) => event.step === "select" && turns++;
  const loop = new AsyncLoop({ selector: new Selector({ trace }) });
  const [ours, peer] = await connectedPair();
  const conn = loop.adopt(ours);
  await using _ = running(loop);
  await peer.write(new TextEncoder().encode("first"));
  assertEquals(new TextDecoder().decode((await deadline(loop.recv(conn), "the bytes"))!), "first");
  await peer.write(new TextEncoder().encode("later")); // nobody waits for these yet
  await delay(50);
  const before = turns;
  await delay(300);
  assertLessOrEqual(turns - before, 1, "the loop kept turning with nobody waiting");
  assertEquals(new TextDecoder().decode((await deadline(loop.recv(conn), "the bytes"))!), "later");
  // EOF stays readable, as on a socket: once it is taken, it must not keep the loop turning.
  peer.close();
  assertEquals(await deadline(loop.recv(conn), "EOF"), null);
  const atEof = turns;
  await delay(300);
  assertLessOrEqual(turns - atEof, 1, "the loop kept turning after EOF with nobody waiting");
  assertEquals(await deadline(loop.recv(conn), "EOF again"), null);
});

Deno.test("recv() resolves null at EOF, and again after", async () => {
  const loop = new AsyncLoop();
  const [ours, peer] = await connectedPair();
  const conn = loop.adopt(ours);
  await using _ = running(loop);
  peer.close();
  assertEquals(await deadline(loop.recv(conn), "EOF"), null);
  assertEquals(await deadline(loop.recv(conn), "EOF again"), null);
});

Deno.test("a reset rejects the waiting recv() and drain()", async () => {
  const loop = new AsyncLoop();
  // A listener closed with a connection it never accepted resets that connection.
  const listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const reset = loop.adopt(await connect(listener.addr.port));
  // And a peer that stops reading, then resets, while send() waits for the queue to drain.
  const [ours, peer] = await connectedPair();
  const conn = loop.adopt(ours);
  await using _ = running(loop); // run() ends when nothing is registered: adopt first
  const receiving = loop.recv(reset);
  listener.close();
  await assertRejects(() => deadline(receiving, "recv() to fail"), Deno.errors.ConnectionReset);
  const sending = loop.send(conn, new Uint8Array(32 << 20));
  await delay(50);
  peer.close(); // with our bytes unread in its buffer: the kernel sends a reset
  const error = await assertRejects(() => deadline(sending, "send() to fail"));
  assert(
    error instanceof Deno.errors.ConnectionReset || error instanceof Deno.errors.BrokenPipe,
    `${error}`,
  );
  assertEquals(conn.error, error);
});

Deno.test("close(), stop() and a second recv() end waits with an error instead of leaving them hanging", async () => {
  const loop = new AsyncLoop();
  const [ours, peer] = await connectedPair();
  const conn = loop.adopt(ours);
  const [ours2, peer2] = await connectedPair();
  const other = loop.adopt(ours2);
  await using _ = running(loop);
  const waiting = loop.recv(conn);
  await assertRejects(() => loop.recv(conn), Error, "already waiting");
  const closing = loop.close(conn); // from another coroutine
  await assertRejects(() => deadline(waiting, "recv() to be interrupted"), Deno.errors.Interrupted);
  await deadline(closing, "close()");
  await assertRejects(() => loop.recv(conn), Deno.errors.BadResource);
  assertEquals(await peer.read(new Uint8Array(1)), null); // closed: EOF
  peer.close();
  // stop() interrupts what waits on every connection and listener.
  using listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const receiving = loop.recv(other);
  const accepting = loop.accept(listener);
  loop.stop();
  await assertRejects(() => deadline(receiving, "recv() to stop"), Deno.errors.Interrupted);
  await assertRejects(() => deadline(accepting, "accept() to stop"), Deno.errors.Interrupted);
  peer2.close();
});

Deno.test("send() resolves at once within the high-water mark and waits above it; close() writes back the queue first", async () => {
  const loop = new AsyncLoop();
  const [ours, peer] = await connectedPair();
  const conn = loop.adopt(ours);
  await using _ = running(loop);
  let settled = false;
  loop.send(conn, pattern(1000)).then(() => settled = true);
  await Promise.resolve();
  assert(settled, "a small send() waited");
  // 32 MiB do not fit in the socket buffers: send() waits until the peer reads them.
  const big = pattern(32 << 20, 1);
  let sent = false;
  const sending = loop.send(conn, big).then(() => sent = true);
  await delay(100);
  assert(!sent, "send() resolved while 32 MiB were still queued");
  const reading = readAll(peer, 1000 + big.length);
  await deadline(sending, "send() once the peer reads");
  // close() right after a send(): every byte still arrives, then EOF.
  const tail = pattern(1 << 20, 2);
  loop.send(conn, tail);
  await deadline(loop.close(conn), "close()");
  const all = await reading;
  assertEquals(all.subarray(1000), big);
  assertEquals(await readAll(peer), tail);
  peer.close();
});

Deno.test("a coroutine's error goes to the loop's error handler, not to the top level", async () => {
  const errors: unknown[] = [];
  const loop = new AsyncLoop({ onError: (error) => errors.push(error) });
  await using server = echoServer(loop);
  loop.spawn(Promise.reject(new Error("one bad handler")));
  const conn = await connect(server.port);
  await roundTrip(conn, pattern(100)); // the server goes on
  conn.close();
  assertEquals(errors.map(String), ["Error: one bad handler"]);
});

Deno.test("callbacks and coroutines share one selector", async () => {
  await using server = echoServer();
  const { selector } = server.loop;
  // A callback echo server on the same selector.
  const listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const read = (key: SelectorKey) => {
    const data = key.recv();
    if (data) key.send(data);
    else {
      selector.unregister(key.resource);
      key.resource.close();
    }
  };
  selector.register(listener, READ, (key) => selector.register(key.accept(), READ, read));
  const [a, b] = await Promise.all([connect(server.port), connect(listener.addr.port)]);
  await Promise.all([roundTrip(a, pattern(100_000, 1)), roundTrip(b, pattern(100_000, 2))]);
  a.close();
  b.close();
});

Deno.test("fifty connections are served at once, each its own bytes", async () => {
  await using server = echoServer();
  const conns = await Promise.all(Array.from({ length: 50 }, () => connect(server.port)));
  await Promise.all(conns.map((conn, i) => roundTrip(conn, pattern(10_000, i))));
  for (const conn of conns) conn.close();
});

Deno.test("coroutines echo datagrams whole with recvfrom() and sendto(), empty ones too", async () => {
  const loop = new AsyncLoop();
  const socket = loop.adopt(
    Deno.listenDatagram({ transport: "udp", hostname: "127.0.0.1", port: 0 }),
  );
  const peer = Deno.listenDatagram({ transport: "udp", hostname: "127.0.0.1", port: 0 });
  loop.spawn((async () => {
    for (;;) {
      const [datagram, from] = await loop.recvfrom(socket);
      await loop.sendto(socket, datagram, from);
    }
  })());
  await using _ = running(loop);
  const address = socket.resource.addr;
  for (const size of [0, 5, 65_507]) {
    const datagram = pattern(size, size);
    await peer.send(datagram, address);
    const [echoed] = await deadline(peer.receive(), `the echo of ${size} bytes`);
    assertEquals(echoed, datagram);
  }
  peer.close();
});

Deno.test("misuse and failed connections get an error at once, never a hang", async () => {
  const loop = new AsyncLoop();
  using listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  // A connection the kernel resets: its listener closes without accepting it.
  const doomed = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const reset = loop.adopt(await connect(doomed.addr.port));
  const [ours, peer] = await connectedPair();
  const conn = loop.adopt(ours);
  await using _ = running(loop);

  const accepting = loop.accept(listener);
  await assertRejects(
    () => deadline(loop.accept(listener), "a second accept()", 1000),
    Error,
    "already waiting",
  );

  // After a reset, every call gives the connection's error.
  const receiving = loop.recv(reset);
  doomed.close();
  const error = await assertRejects(() => deadline(receiving, "recv() to fail"));
  await assertRejects(
    () => deadline(loop.send(reset, pattern(10)), "send()", 1000),
    Deno.errors.ConnectionReset,
  );
  await assertRejects(
    () => deadline(loop.drain(reset), "drain()", 1000),
    Deno.errors.ConnectionReset,
  );
  assertEquals(reset.error, error);

  // interrupt() ends a send() waiting for a peer that does not read; the bytes stay queued.
  const big = pattern(32 << 20, 3);
  const sending = loop.send(conn, big);
  await delay(50);
  loop.interrupt(conn);
  await assertRejects(() => deadline(sending, "send() to be interrupted"), Deno.errors.Interrupted);
  const reading = readAll(peer, big.length);
  await deadline(loop.drain(conn), "the queue to drain once the peer reads");
  assertEquals(await reading, big);

  // Closed: calls are refused, and closing again does nothing.
  await deadline(loop.close(conn), "close()");
  await deadline(loop.close(conn), "a second close()");
  await assertRejects(
    () => deadline(loop.send(conn, pattern(10)), "send()", 1000),
    Deno.errors.BadResource,
    "send() on a closed connection",
  );
  await assertRejects(
    () => deadline(loop.drain(conn), "drain()", 1000),
    Deno.errors.BadResource,
    "drain() on a closed connection",
  );
  peer.close();

  // Stopped: a listener it never saw is refused too.
  loop.stop();
  await assertRejects(() => deadline(accepting, "accept() to stop"), Deno.errors.Interrupted);
  using late = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  await assertRejects(
    () => deadline(loop.accept(late), "accept()", 1000),
    Deno.errors.Interrupted,
    "stopped",
  );
  loop.abort(reset);
});

Deno.test("the trace says what each coroutine resumes with: an error, a drained send, a datagram", async () => {
  const wakes: string[] = [];
  const trace = (event: WakeEvent) => wakes.push(formatTrace(event).trim());
  const loop = new AsyncLoop({ trace });
  const doomed = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const reset = loop.adopt(await connect(doomed.addr.port));
  const [ours, peer] = await connectedPair();
  const conn = loop.adopt(ours);
  const socket = loop.adopt(
    Deno.listenDatagram({ transport: "udp", hostname: "127.0.0.1", port: 0 }),
  );
  const sender = Deno.listenDatagram({ transport: "udp", hostname: "127.0.0.1", port: 0 });
  await using _ = running(loop);

  const receiving = loop.recv(reset);
  doomed.close();
  await assertRejects(() => deadline(receiving, "recv() to fail"), Deno.errors.ConnectionReset);
  const big = pattern(32 << 20, 4);
  const sending = loop.send(conn, big); // waits: the peer reads only now
  const reading = readAll(peer, big.length);
  await deadline(sending, "send() once the peer reads");
  await reading;
  const datagram = loop.recvfrom(socket);
  await sender.send(pattern(7), socket.resource.addr);
  await deadline(datagram, "a datagram");

  assertMatch(wakes.join("\n"), /^→ recv\(\) on conn \S+ resumes: ConnectionReset: /m);
  assertMatch(wakes.join("\n"), /^→ send\(\) on conn \S+ resumes: written$/m);
  const { port } = sender.addr as Deno.NetAddr;
  assertMatch(
    wakes.join("\n"),
    new RegExp(`^→ recvfrom\\(\\) on udp \\S+ resumes: 7 bytes from 127\\.0\\.0\\.1:${port}$`, "m"),
  );
  peer.close();
  sender.close();
  loop.abort(reset);
});
