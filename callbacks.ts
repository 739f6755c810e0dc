/**
 * The lesson's second step: the echo server as callbacks on a selector. It
 * reads like Python's selectors example, an accept callback and a read
 * callback that the loop dispatches:
 *
 * ```python
 * def accept(sock, mask):
 *     conn, addr = sock.accept()  # Should be ready
 *     sel.register(conn, selectors.EVENT_READ, read)
 *
 * def read(conn, mask):
 *     data = conn.recv(1000)  # Should be ready
 *     if data:
 *         conn.send(data)  # Hope it won't block
 *     else:
 *         sel.unregister(conn)
 *         conn.close()
 * ```
 *
 * plus what the toy leaves out: every byte written back (`send()` queues),
 * errors that end one connection only, the connection cap, and a graceful
 * shutdown. server.ts does the counting and logging (see engine.ts).
 *
 * @module
 */

import { type ConnResource, READ, type SelectorKey, WRITE } from "./loop.ts";
import { describeError } from "./log.ts";
import type { ConnInfo, EchoServer, Engine } from "./engine.ts";

/** A connection's key, with the server's record of it attached. */
type ConnKey = SelectorKey<ConnInfo>;

/**
 * The server in the callbacks style.
 *
 * @param server What every style shares: counting, logging, limits.
 * @returns The engine that serve() runs.
 */
export function callbacks(server: EchoServer): Engine {
  const { selector, listener } = server;

  // The listener's callback: the lesson's accept().
  function accept(key: SelectorKey, _mask: number): void {
    let conn;
    try {
      conn = key.accept(); // should be ready
    } catch (error) {
      return server.acceptFailed(error);
    }
    server.opened(selector.register(conn, READ, read, server.welcome(conn)));
  }

  // A connection's life, and the callback that runs in each state:
  //
  //   state        interest  callback      what it does
  //   reading      READ      read()        echoes what arrives; at EOF → flushing
  //   flushing     WRITE     flushed()     the echo is all written: close → closed
  //   draining     WRITE     drained()     (shutdown) the echo is all written:
  //                                        half-close → half-closed
  //   half-closed  READ      halfClosed()  (shutdown) drops input until the peer's
  //                                        EOF → closed
  //   closed       none      (none)        unregistered and closed; also on any error
  //
  // At shutdown every reading or flushing connection becomes draining.

  // Reading: the lesson's read().
  function read(key: ConnKey, _mask: number): void {
    let data;
    try {
      data = key.recv(); // should be ready
    } catch (error) {
      return server.close(key, error); // a reset or the like: this connection only
    }
    if (data) {
      server.received(key, data);
      key.send(data); // queued: the loop writes every byte
    } else {
      // EOF: the peer is done sending. Write back what is queued, then close.
      selector.modify(key.resource, WRITE, flushed);
    }
  }

  function flushed(key: ConnKey, _mask: number): void {
    server.close(key, key.error);
  }

  function drained(key: ConnKey, _mask: number): void {
    if (key.error) return server.close(key, key.error);
    const conn = key.resource as ConnResource;
    conn.closeWrite().catch((error) => server.close(key, error));
    selector.modify(conn, READ, halfClosed);
  }

  function halfClosed(key: ConnKey, _mask: number): void {
    let data;
    try {
      data = key.recv();
    } catch (error) {
      return server.close(key, error);
    }
    if (data === null) server.close(key);
  }

  // UDP: one callback, the lesson's read() with recvfrom() and sendto().
  function echoDatagram(key: SelectorKey, _mask: number): void {
    let datagram, from;
    try {
      [datagram, from] = key.recvfrom(); // should be ready
    } catch (error) {
      return server.log.error(`udp receive failed: ${describeError(error)}`); // it tries again
    }
    if (server.answer(datagram, from)) key.sendto(datagram, from);
  }

  function datagramsFlushed(key: SelectorKey, _mask: number): void {
    selector.unregister(key.resource);
    key.resource.close();
    server.datagramsClosed();
  }

  return {
    run() {
      selector.register(listener, READ, accept);
      return selector.run();
    },
    accepting(on) {
      selector.modify(listener, on ? READ : 0);
    },
    stopAccepting() {
      selector.unregister(listener);
    },
    closeNow(conn) {
      selector.unregister(conn.resource);
      conn.resource.close();
    },
    shutdown(conn) {
      selector.modify(conn.resource, WRITE, drained);
    },
    serveDatagrams(socket) {
      selector.register(socket, READ, echoDatagram);
    },
    closeDatagrams(socket) {
      selector.modify(socket, WRITE, datagramsFlushed); // no more reads; send what is queued
    },
    stop() {
      selector.close();
    },
  };
}
