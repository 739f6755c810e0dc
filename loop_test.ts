import { assert, assertEquals, assertRejects, assertThrows } from "@std/assert";
import { READ, Selector, type SelectorKey, WRITE } from "./loop.ts";
import { connect, connectedPair, deadline, delay, readAll } from "./testing/helpers.ts";

/** Selects until `key` is reported, and returns its mask; fails after 5 s. */
async function nextEvent(selector: Selector, key: SelectorKey<unknown>): Promise<number> {
  for (const end = performance.now() + 5000; performance.now() < end;) {
    for (const [ready, mask] of await selector.select(100)) if (ready === key) return mask;
  }
  throw new Error("the key was not reported ready within 5 s");
}

const noop = () => {};
const text = (s: string) => new TextEncoder().encode(s);

Deno.test("select() with a timeout returns nothing when nothing is ready", async () => {
  const [ours, peer] = await connectedPair();
  const selector = new Selector();
  selector.register(ours, READ, noop);
  const start = performance.now();
  assertEquals(await selector.select(50), []);
  const took = performance.now() - start;
  assert(took >= 40 && took < 1000, `select(50) returned after ${took} ms`);
  assertEquals(await selector.select(0), []);
  assertEquals(await deadline(selector.select(-5), "select(-5)", 100), []); // less than 0 polls
  assertEquals(await deadline(selector.select(NaN), "select(NaN)", 100), []); // as does NaN
  const forever = selector.select(Infinity); // past setTimeout's range: no limit, as none
  assertEquals(await Promise.race([forever, delay(100).then(() => "waits")]), "waits");
  selector.close();
  assertEquals(await deadline(forever, "select() to return after close()", 1000), []);
  peer.close();
});

Deno.test("an empty selector's select() returns at once", async () => {
  const selector = new Selector();
  assertEquals(await deadline(selector.select(), "select() on an empty selector", 100), []);
});

Deno.test("a listener key becomes READ-ready and accept() takes the connection", async () => {
  const listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const selector = new Selector();
  const key = selector.register(listener, READ, noop, "data");
  assertEquals(key.data, "data");
  assertEquals(key.resource, listener);
  const peer = await connect(listener.addr.port);
  assertEquals(await nextEvent(selector, key), READ);
  const conn = key.accept();
  assertEquals((conn.remoteAddr as Deno.NetAddr).port, (peer.localAddr as Deno.NetAddr).port);
  conn.close();
  peer.close();
  selector.close();
});

Deno.test("recv() returns the bytes, then null at EOF, and null again after", async () => {
  const [ours, peer] = await connectedPair();
  const selector = new Selector();
  const key = selector.register(ours, READ, noop);
  await peer.write(text("hello"));
  assertEquals(await nextEvent(selector, key), READ);
  assertEquals(key.recv(), text("hello"));
  assertThrows(() => key.recv(), Deno.errors.WouldBlock);
  peer.close();
  assertEquals(await nextEvent(selector, key), READ);
  assertEquals(key.recv(), null);
  assertEquals(key.recv(), null);
  selector.close();
});

Deno.test("modify() to interest 0 pauses a key and back to READ resumes it", async () => {
  const [ours, peer] = await connectedPair();
  const selector = new Selector();
  const key = selector.register(ours, 0, noop);
  await peer.write(text("early"));
  assertEquals(await selector.select(50), []);
  const first = () => {};
  selector.modify(ours, READ, first, 7);
  assertEquals([key.events, key.callback, key.data], [READ, first, 7]);
  assertEquals(await nextEvent(selector, key), READ);
  assertEquals(key.recv(), text("early"));
  selector.close();
  peer.close();
});

Deno.test("unregister() stops reporting a key; unknown and double registrations throw", async () => {
  const [ours, peer] = await connectedPair();
  const selector = new Selector();
  const key = selector.register(ours, READ, noop);
  assertThrows(() => selector.register(ours, READ, noop), Error, "already registered");
  assertEquals(selector.getKey(ours), key);
  assertEquals(selector.unregister(ours), key);
  assertEquals(selector.getKey(ours), undefined);
  assertEquals(selector.size, 0);
  assertThrows(() => selector.unregister(ours), Error, "not registered");
  assertThrows(() => selector.modify(ours, READ), Error, "not registered");
  await peer.write(text("ignored"));
  assertEquals(await selector.select(20), []);
  ours.close(); // ends the read Deno still had in flight
  peer.close();
});

Deno.test("invalid interest masks are refused", async () => {
  const [ours, peer] = await connectedPair();
  using listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const selector = new Selector();
  assertThrows(() => selector.register(listener, WRITE, noop), RangeError);
  assertThrows(() => selector.register(ours, 4, noop), RangeError);
  assertThrows(() => selector.register(ours, 1.5, noop), RangeError);
  const udp = Deno.listenDatagram({ transport: "udp", hostname: "127.0.0.1", port: 0 });
  assertThrows(() => selector.register(udp, 4, noop), RangeError);
  udp.close();
  assertEquals(selector.size, 0);
  ours.close();
  peer.close();
});

Deno.test("WRITE is ready while nothing is queued, and again once a send() is written", async () => {
  const [ours, peer] = await connectedPair();
  const selector = new Selector();
  const key = selector.register(ours, WRITE, noop);
  assertEquals(await nextEvent(selector, key), WRITE);
  key.send(text("abc"));
  assertEquals(key.queued, 3);
  assertEquals(await nextEvent(selector, key), WRITE);
  assertEquals(key.queued, 0);
  assertEquals(await readAll(peer, 3), text("abc"));
  selector.close();
  peer.close();
});

Deno.test("send() writes every byte of a large payload in order, across partial writes", async () => {
  const [ours, peer] = await connectedPair();
  const selector = new Selector();
  const key = selector.register(ours, 0, noop);
  const payload = new Uint8Array(8 << 20).map((_, i) => (i * 7) % 251);
  for (let i = 0; i < payload.length; i += 1 << 20) key.send(payload.subarray(i, i + (1 << 20)));
  const received = await readAll(peer, payload.length);
  assertEquals(received.length, payload.length);
  assertEquals(received, payload);
  assertEquals(key.queued, 0);
  selector.close();
  peer.close();
});

Deno.test("reads pause above the high-water mark until the peer reads", async () => {
  const [ours, peer] = await connectedPair();
  const selector = new Selector({ highWaterMark: 1024, lowWaterMark: 256 });
  let received = 0;
  const echo = (key: SelectorKey) => {
    const data = key.recv();
    if (data) {
      received += data.length;
      key.send(data.slice()); // a copy: the read buffer is free at once
    }
  };
  selector.register(ours, READ, echo);
  const running = selector.run();
  // The peer writes 16 MiB and reads nothing until its writes stall.
  const total = 16 << 20;
  const writing = (async () => {
    const chunk = new Uint8Array(64 * 1024);
    for (let sent = 0; sent < total;) sent += await peer.write(chunk.subarray(0, total - sent));
  })();
  await delay(300);
  const stalledAt = received;
  assert(stalledAt < total, "the server kept reading while its echo was not read");
  assert(selector.getKey(ours)!.queued <= 1024 + 64 * 1024, "queued beyond the bound");
  const echoed = await readAll(peer, total);
  await writing;
  assertEquals(echoed.length, total);
  assertEquals(received, total);
  selector.close();
  await deadline(running, "run() to end after close()");
  peer.close();
});

Deno.test("a reset reaches its key as an error from recv(), never as an unhandled rejection", async () => {
  // A listener closed with a connection it never accepted resets that connection.
  const listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const conn = await connect(listener.addr.port);
  const selector = new Selector();
  const key = selector.register(conn, READ, noop);
  listener.close();
  assertEquals(await nextEvent(selector, key), READ);
  assertThrows(() => key.recv(), Deno.errors.ConnectionReset);
  assert(key.error instanceof Deno.errors.ConnectionReset);
  assertThrows(() => key.send(text("more")), Deno.errors.ConnectionReset);
  selector.close();
});

Deno.test("a callback that leaves its result is called again, without starving I/O", async () => {
  const [ours, peer] = await connectedPair();
  const selector = new Selector();
  let calls = 0;
  const key = selector.register(ours, READ, () => {
    if (++calls === 3) key.recv();
  });
  await peer.write(text("x"));
  for (let i = 0; i < 3; i++) {
    for (const [k, mask] of await selector.select(1000)) k.callback(k, mask);
  }
  assertEquals(calls, 3);
  // A timer still fires while a key stays ready and is never taken.
  const stubborn = selector.register(peer, READ, noop);
  await ours.write(text("y"));
  let timerFired = false;
  setTimeout(() => timerFired = true, 1);
  for (let i = 0; i < 1000 && !timerFired; i++) await selector.select(1000);
  assert(timerFired);
  assertEquals(stubborn.recv(), text("y"));
  selector.close();
});

Deno.test("run() calls each ready key's callback and ends when no key is left", async () => {
  const listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const selector = new Selector();
  const seen: string[] = [];
  selector.register(listener, READ, (key) => {
    const conn = key.accept();
    seen.push("accept");
    selector.register(conn, READ, (key: SelectorKey) => {
      const data = key.recv();
      seen.push(data ? "read" : "eof");
      if (!data) {
        selector.unregister(conn);
        conn.close();
        selector.unregister(listener);
        listener.close();
      }
    });
  });
  const running = selector.run();
  const peer = await connect(listener.addr.port);
  await peer.write(text("hi"));
  await delay(20);
  peer.close();
  await deadline(running, "run() to end once no key is left");
  assertEquals(seen, ["accept", "read", "eof"]);
});

Deno.test("close() closes every resource and wakes a waiting select()", async () => {
  const [ours, peer] = await connectedPair();
  const selector = new Selector();
  selector.register(ours, READ, noop);
  const waiting = selector.select();
  selector.close();
  assertEquals(await deadline(waiting, "select() to return after close()", 1000), []);
  await assertRejects(() => ours.write(text("x")), Deno.errors.BadResource);
  assertThrows(() => selector.register(peer, READ, noop), Error, "closed");
  await selector.run(); // returns at once: the selector is closed
  peer.close();
});

Deno.test("only one select() may wait at a time", async () => {
  const [ours, peer] = await connectedPair();
  const selector = new Selector();
  selector.register(ours, READ, noop);
  const waiting = selector.select();
  await assertRejects(() => selector.select(), Error, "another select()");
  selector.close();
  await deadline(waiting, "select() to return after close()", 1000);
  peer.close();
});

Deno.test("water marks are checked", () => {
  assertThrows(() => new Selector({ highWaterMark: 10, lowWaterMark: 20 }), RangeError);
  assertThrows(() => new Selector({ lowWaterMark: -1 }), RangeError);
});

Deno.test("select() over 2,000 idle keys with one active returns just that one", async () => {
  const listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const selector = new Selector();
  const peers: Deno.Conn[] = [];
  for (let i = 0; i < 2001; i++) {
    const [ours, peer] = await Promise.all([listener.accept(), connect(listener.addr.port)]);
    selector.register(ours, READ, noop, i);
    peers.push(peer);
  }
  listener.close();
  await peers[1234].write(text("x"));
  const events = await selector.select(5000);
  assertEquals(events.map(([key, mask]) => [key.data, mask]), [[1234, READ]]);
  selector.close();
  for (const peer of peers) peer.close();
});

/** A datagram socket on loopback. */
function udpSocket(): Deno.DatagramConn {
  return Deno.listenDatagram({ transport: "udp", hostname: "127.0.0.1", port: 0 });
}

Deno.test("a datagram key is READ-ready per datagram; recvfrom() gives it whole with its sender", async () => {
  const server = udpSocket();
  const peer = udpSocket();
  const selector = new Selector();
  const key = selector.register(server, READ, noop);
  const serverAddr = server.addr as Deno.NetAddr;
  for (const size of [0, 1, 1500, 65_507]) {
    const datagram = new Uint8Array(size).map((_, i) => (i * 7 + size) & 0xff);
    await peer.send(datagram, serverAddr);
    assertEquals(await nextEvent(selector, key), READ);
    const [received, from] = key.recvfrom();
    assertEquals(received, datagram, `a ${size}-byte datagram`);
    assertEquals((from as Deno.NetAddr).port, (peer.addr as Deno.NetAddr).port);
    key.sendto(received, from); // echo: lent until sent
    const [echoed] = await deadline(peer.receive(), `the echo of ${size} bytes`);
    assertEquals(echoed, datagram);
  }
  assertThrows(() => key.recv(), TypeError);
  selector.close();
  peer.close();
});

Deno.test("a datagram the kernel refuses is dropped, and the socket goes on", async () => {
  const server = udpSocket();
  const peer = udpSocket();
  const selector = new Selector();
  const key = selector.register(server, WRITE, noop);
  key.sendto(text("lost"), { transport: "udp", hostname: "127.0.0.1", port: 0 }); // EINVAL
  key.sendto(text("kept"), peer.addr);
  const [echoed] = await deadline(peer.receive(), "the second datagram");
  assertEquals(echoed, text("kept"));
  assertEquals(await nextEvent(selector, key), WRITE);
  assertEquals([key.queued, key.error], [0, undefined]);
  selector.close();
  peer.close();
});

Deno.test("a key's methods that do not fit its resource throw a TypeError naming the right key", async () => {
  const [ours, peer] = await connectedPair();
  using listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const selector = new Selector();
  const listening = selector.register(listener, READ, noop);
  const conn = selector.register(ours, READ, noop);
  const udp = { transport: "udp", hostname: "127.0.0.1", port: 9 } as const;
  assertEquals(listening.queued, 0);
  assertThrows(() => listening.recv(), TypeError, "recv() needs a connection's key");
  assertThrows(() => listening.send(text("x")), TypeError, "send() needs a connection's key");
  assertThrows(
    () => listening.retain(),
    TypeError,
    "retain() needs a connection's or datagram socket's key",
  );
  assertThrows(
    () => listening.release(),
    TypeError,
    "release() needs a connection's or datagram socket's key",
  );
  assertThrows(() => conn.accept(), TypeError, "accept() needs a listener's key");
  assertThrows(() => conn.recvfrom(), TypeError, "recvfrom() needs a datagram socket's key");
  assertThrows(() => conn.sendto(text("x"), udp), TypeError, "sendto() needs a datagram");
  selector.close();
  peer.close();
});

Deno.test("send() and sendto() after unregister() throw BadResource; an empty send() queues nothing", async () => {
  const [ours, peer] = await connectedPair();
  const socket = udpSocket();
  const selector = new Selector();
  const conn = selector.register(ours, WRITE, noop);
  conn.send(new Uint8Array(0));
  assertEquals(conn.queued, 0);
  assertEquals(await nextEvent(selector, conn), WRITE);
  const datagrams = selector.register(socket, READ, noop);
  assertThrows(() => datagrams.recvfrom(), Deno.errors.WouldBlock, "before the key was ready");
  selector.unregister(ours);
  selector.unregister(socket);
  assertThrows(() => conn.send(text("late")), Deno.errors.BadResource, "unregistered key");
  assertThrows(() => datagrams.sendto(text("late"), peer.localAddr), Deno.errors.BadResource);
  selector.close();
  ours.close();
  socket.close();
  peer.close();
});

Deno.test("a key unregistered by an earlier callback of the same turn is not called", async () => {
  const [a, peerA] = await connectedPair();
  const [b, peerB] = await connectedPair();
  const selector = new Selector();
  const called: SelectorKey[] = [];
  // Both are WRITE-ready at once: whichever runs first unregisters both.
  const callback = (key: SelectorKey) => {
    called.push(key);
    selector.close(); // unregisters every key, and ends run()
  };
  selector.register(a, WRITE, callback);
  selector.register(b, WRITE, callback);
  await deadline(selector.run(), "run() to end");
  assertEquals(called.length, 1, `called: ${called}`);
  // And select() does not report a key unregistered while it was on the ready list.
  const [c, peerC] = await connectedPair();
  const other = new Selector();
  other.register(c, WRITE, noop); // ready at once
  other.unregister(c);
  assertEquals(await other.select(0), []);
  c.close();
  for (const peer of [peerA, peerB, peerC]) peer.close();
});

Deno.test("a connection accepted after its listener's unregister() is closed, not leaked", async () => {
  using listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const selector = new Selector();
  selector.register(listener, READ, noop); // an accept is now in flight
  selector.unregister(listener);
  const peer = await connect(listener.addr.port);
  assertEquals(await readAll(peer), new Uint8Array(0), "EOF from the connection nobody took");
  peer.close();
  selector.close();
});

Deno.test("a listener or a datagram socket closed under its key: the error once, never retried", async () => {
  const listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const socket = udpSocket();
  const selector = new Selector();
  const listening = selector.register(listener, READ, noop);
  const datagrams = selector.register(socket, READ | WRITE, noop);
  assertEquals(await nextEvent(selector, datagrams), WRITE); // nothing queued
  listener.close(); // by its owner, behind the selector's back
  socket.close();
  assertEquals(await nextEvent(selector, listening), READ);
  assertThrows(() => listening.accept(), Deno.errors.BadResource);
  assertThrows(() => listening.accept(), Deno.errors.BadResource); // again: not retried
  assertEquals(await nextEvent(selector, datagrams), READ | WRITE);
  const error = datagrams.error;
  assert(error instanceof Deno.errors.BadResource || error instanceof Deno.errors.Interrupted);
  assertThrows(() => datagrams.recvfrom());
  assertThrows(() => datagrams.sendto(text("x"), socket.addr));
  selector.close();
});

/** A stand-in datagram socket whose receives and sends do what a test says. */
function scriptedSocket(
  receive: () => Promise<[Uint8Array, Deno.Addr]> = () => new Promise(noop), // nothing arrives
  send: () => Promise<number> = () => Promise.resolve(0),
): Deno.DatagramConn {
  const addr = { transport: "udp", hostname: "127.0.0.1", port: 9 };
  return { addr, receive, send, close: noop } as unknown as Deno.DatagramConn;
}

Deno.test("a passing receive error is reported, and the next receive waits a pause: no spin", async () => {
  const from = { transport: "udp", hostname: "127.0.0.1", port: 5 } as const;
  let receives = 0;
  const socket = scriptedSocket(() =>
    ++receives <= 3
      ? Promise.reject(new Error("No route to host")) // an ICMP error, say
      : Promise.resolve([text("after"), from])
  );
  const selector = new Selector();
  const seen: string[] = [];
  selector.register(socket, READ, (key) => {
    try {
      seen.push(new TextDecoder().decode(key.recvfrom()[0]));
      selector.close();
    } catch (error) {
      seen.push((error as Error).message);
    }
  });
  const start = performance.now();
  await deadline(selector.run(), "the datagram after the errors");
  const took = performance.now() - start;
  assertEquals(seen, [...Array(3).fill("No route to host"), "after"]);
  // Timers never fire early, so this lower bound cannot flake: three pauses of 10 ms.
  assert(took >= 29, `three errors and a datagram in ${took.toFixed(1)} ms: no pause`);
});

Deno.test("a socket gone while sending: its queue is dropped, the error reported, sendto() refused", async () => {
  const to = { transport: "udp", hostname: "127.0.0.1", port: 5 } as const;
  const socket = scriptedSocket(
    undefined,
    () => Promise.reject(new Deno.errors.BadResource("closed")),
  );
  const selector = new Selector();
  const key = selector.register(socket, WRITE, noop);
  key.sendto(text("one"), to);
  key.sendto(text("two"), to);
  assertEquals(key.queued, 6);
  assertEquals(await nextEvent(selector, key), WRITE);
  assertEquals(key.queued, 0);
  assert(key.error instanceof Deno.errors.BadResource);
  assertThrows(() => key.sendto(text("three"), to), Deno.errors.BadResource);
  selector.close();
});
