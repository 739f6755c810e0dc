/**
 * How the server's work is split: server.ts keeps what every style shares
 * (limits, logs, counters, idle timeout, shutdown) and an engine moves the
 * bytes in one style of the lesson: callbacks.ts (the accept and read
 * callbacks on a selector) or coroutines.ts (async/await on the same loop).
 * This file is the contract between them: what an engine does for the
 * server, and what it may ask of the server.
 *
 * @module
 */

import type {
  BaseSelector,
  ConnResource,
  DatagramResource,
  ListenerResource,
  Resource,
} from "./loop.ts";
import type { AnyTraceEvent } from "./trace.ts";
import type { Log } from "./log.ts";

/** What the server keeps for each connection (little: idle connections add up). */
export interface ConnInfo {
  /** Its number among the connections accepted, to tell Unix socket peers apart in logs. */
  id: number;
  /** Bytes received, each echoed (or queued to be). */
  bytes: number;
  /** performance.now() of the last read, for the idle timeout. */
  lastRead: number;
  /** performance.now() when it was accepted, for its duration in logs and metrics. */
  opened: number;
}

/** A served connection, as its style holds it: a selector key, or a coroutine's Connection. */
export interface ServedConn {
  /** The connection itself (a {@linkcode ConnResource}). */
  readonly resource: Resource;
  /** Bytes queued and not yet written back. */
  readonly queued: number;
  /** The server's record of it. */
  data: ConnInfo;
}

/** What an engine may ask of the server: each step of a connection's life, counted and logged. */
export interface EchoServer {
  /** The selector the engine registers with. */
  readonly selector: BaseSelector;
  /** The listener to accept from. */
  readonly listener: ListenerResource;
  /** Where errors of the engine's own are logged. */
  readonly log: Log;
  /** The trace function, if `--trace` is on: the engine passes it to what it builds. */
  readonly trace: ((event: AnyTraceEvent) => void) | undefined;
  /** True once shutdown() has begun: stop echoing, finish what was read. */
  readonly shuttingDown: boolean;
  /** A connection was accepted: logs it, and makes its record. */
  welcome(conn: ConnResource): ConnInfo;
  /** The connection is registered and served: counts it, and stops accepting at the cap. */
  opened(conn: ServedConn): void;
  /** Accepting failed: logs why (once while out of descriptors; the selector backs off). */
  acceptFailed(error: unknown): void;
  /** Bytes arrived, about to be echoed: counts them, and keeps the connection from idling out. */
  received(conn: ServedConn, data: Uint8Array): void;
  /** The connection has ended, in an error or not: counts it, and calls the engine's closeNow(). */
  close(conn: ServedConn, error?: unknown): void;
  /** A datagram arrived: whether to echo it to its sender (see udp_guard.ts). */
  answer(datagram: Uint8Array, from: Deno.Addr): boolean;
  /** The datagram socket is closed, at shutdown. */
  datagramsClosed(): void;
}

/** What an engine does for the server: what differs between the styles. */
export interface Engine {
  /** Serves until stop(). */
  run(): Promise<void>;
  /** Stops accepting (at the connection cap: newcomers wait in the backlog), or accepts again. */
  accepting(on: boolean): void;
  /** Stops accepting for good: the server is shutting down (it closes the listener after). */
  stopAccepting(): void;
  /** Closes a connection now. */
  closeNow(conn: ServedConn): void;
  /** At shutdown: writes back what is queued, half-closes, waits for the peer's EOF, closes. */
  shutdown(conn: ServedConn): void;
  /** Starts echoing datagrams on the UDP socket. */
  serveDatagrams(socket: DatagramResource): void;
  /** At shutdown: sends the replies queued, then closes the socket and calls datagramsClosed(). */
  closeDatagrams(socket: DatagramResource): void;
  /** Ends run(): the last connection is closed. */
  stop(): void;
}
