/**
 * The lesson's third step: the same echo server written with coroutines on
 * the same loop (async_loop.ts). It reads like asyncio's socket version:
 *
 * ```python
 * async def handle(loop, conn):
 *     while data := await loop.sock_recv(conn, 1000):
 *         await loop.sock_sendall(conn, data)
 *     conn.close()
 *
 * async def main():
 *     while True:
 *         conn, addr = await loop.sock_accept(sock)
 *         loop.create_task(handle(loop, conn))
 * ```
 *
 * plus what the toy leaves out, as callbacks.ts has it: a connection goes
 * through the same states, here as the steps of one coroutine. server.ts does
 * the counting and logging (see engine.ts).
 *
 * The lesson's first step, the blocking server, is this file too (`--style
 * blocking`). Python's blocking server serves one connection to its end, then
 * accepts the next:
 *
 * ```python
 * while True:
 *     conn, addr = sock.accept()
 *     while data := conn.recv(1024):
 *         conn.sendall(data)
 *     conn.close()
 * ```
 *
 * Deno has no blocking socket: every read and write returns a promise. So the
 * blocking server is the coroutine server whose accept loop waits for each
 * connection's coroutine to end before it accepts the next one: `await
 * handle(conn)` where the coroutine server says `loop.spawn(handle(conn))`.
 * One word, and every other client waits in the kernel's backlog meanwhile:
 * the problem the selector solves.
 *
 * @module
 */

import { AsyncLoop, type Connection, type DatagramSocket } from "./async_loop.ts";
import type { ConnInfo, EchoServer, Engine } from "./engine.ts";
import { describeError } from "./log.ts";

/** How {@linkcode coroutines} serves. */
export interface CoroutineOptions {
  /** The blocking server: serve each connection to its end before accepting the next. */
  oneAtATime?: boolean;
}

/**
 * The server in the coroutine style, or blocking (one connection at a time).
 *
 * @param server What every style shares: counting, logging, limits.
 * @param options `oneAtATime` for the blocking server.
 * @returns The engine that serve() runs.
 */
export function coroutines(server: EchoServer, options: CoroutineOptions = {}): Engine {
  const { selector, listener, log } = server;
  const loop = new AsyncLoop({
    selector,
    trace: server.trace,
    onError: (error) => log.error(`unexpected error: ${describeError(error)}`),
  });
  /** Set while at the connection cap: the accept loop waits for it. */
  let slotFree: PromiseWithResolvers<void> | undefined = undefined;
  /** The UDP socket, with --udp. */
  let udpSocket: DatagramSocket | undefined = undefined;

  // A connection's life as one coroutine, through the states of callbacks.ts:
  // reading, flushing at EOF, and at shutdown draining and half-closed; closed
  // on any error.
  async function handle(conn: Connection<ConnInfo>): Promise<void> {
    try {
      for (let data; !server.shuttingDown && (data = await loop.recv(conn)) !== null;) {
        server.received(conn, data);
        await loop.send(conn, data); // waits only while the peer does not read
      }
      if (!server.shuttingDown) { // flushing: write back what is queued, then close
        await loop.drain(conn);
        return server.close(conn, conn.error);
      }
    } catch (error) {
      const interrupted = error instanceof Deno.errors.Interrupted;
      if (!(server.shuttingDown && interrupted)) return server.close(conn, error);
    }
    try { // draining, then half-closed
      await loop.drain(conn);
      await conn.resource.closeWrite();
      while ((await loop.recv(conn)) !== null); // drop input until the peer's EOF
      server.close(conn);
    } catch (error) {
      server.close(conn, error);
    }
  }

  // The accept loop: the lesson's accept(), as a coroutine, spawning one per connection.
  async function acceptLoop(): Promise<void> {
    while (!server.shuttingDown) {
      if (slotFree) await slotFree.promise;
      if (server.shuttingDown) return;
      let conn: Connection<ConnInfo>;
      try {
        conn = await loop.accept(listener) as Connection<ConnInfo>;
      } catch (error) {
        if (server.shuttingDown) return;
        server.acceptFailed(error);
        continue;
      }
      conn.data = server.welcome(conn.resource);
      server.opened(conn);
      if (options.oneAtATime) await handle(conn); // blocking: the others wait in the backlog
      else loop.spawn(handle(conn));
    }
  }

  // UDP: one coroutine for the socket, with recvfrom() and sendto().
  async function echoDatagrams(socket: DatagramSocket): Promise<void> {
    while (!server.shuttingDown) {
      let datagram, from;
      try {
        [datagram, from] = await loop.recvfrom(socket);
      } catch (error) {
        if (server.shuttingDown) return;
        log.error(`udp receive failed: ${describeError(error)}`);
        continue; // the selector pauses before it receives again
      }
      if (server.answer(datagram, from)) await loop.sendto(socket, datagram, from);
    }
  }

  return {
    run() {
      loop.spawn(acceptLoop());
      return loop.run();
    },
    accepting(on) {
      if (!on) slotFree ??= Promise.withResolvers();
      else {
        slotFree?.resolve();
        slotFree = undefined;
      }
    },
    stopAccepting() {
      loop.abort(listener); // interrupts the waiting accept()
      slotFree?.resolve();
    },
    closeNow(conn) {
      loop.abort(conn as Connection); // interrupts what its coroutine waits for
    },
    shutdown(conn) {
      loop.interrupt(conn as Connection); // its coroutine goes on to drain it
    },
    serveDatagrams(socket) {
      udpSocket = loop.adopt(socket);
      loop.spawn(echoDatagrams(udpSocket));
    },
    closeDatagrams() {
      loop.close(udpSocket!).then(() => server.datagramsClosed()); // sends the queue first
    },
    stop() {
      loop.stop();
    },
  };
}
