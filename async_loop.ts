/**
 * The lesson's next step: coroutines on the same loop. `await loop.recv(conn)`
 * instead of a read callback, built the way asyncio builds `loop.sock_recv()`
 * on its selector: each call registers interest in an event and returns a
 * promise, and the selector's callback, when the event comes, takes the
 * result and resolves the promise. The coroutine never sees the selector.
 *
 * | asyncio                          | here                                  |
 * | -------------------------------- | ------------------------------------- |
 * | `await loop.sock_accept(sock)`   | `await loop.accept(listener)`         |
 * | `await loop.sock_recv(conn, n)`  | `await loop.recv(conn)` (null at EOF) |
 * | `await loop.sock_sendall(conn, data)` | `await loop.send(conn, data)`    |
 * | `await writer.drain()`           | `await loop.drain(conn)`              |
 * | `asyncio.create_task(coro)`      | `loop.spawn(coro)`                    |
 * | `loop.run_forever()`, `loop.stop()` | `await loop.run()`, `loop.stop()` |
 *
 * `run()` is the selector's `run()`: it ends when `stop()` is called or when
 * nothing is registered any more, so accept or adopt something before it.
 *
 * Nothing here does I/O of its own: every byte goes through loop.ts's send
 * queue, backpressure and fairness, and every promise is resolved from the
 * selector's dispatch, so callbacks and coroutines can share one selector.
 * This file imports only `./loop.ts`: copy both to get both styles.
 *
 * Interest follows the waiters, as with asyncio's add_reader/remove_reader,
 * so a ready resource nobody waits for costs nothing. One refinement keeps it
 * cheap: the bytes `recv()` gives are the read buffer itself, and the loop
 * retains them (`key.retain()`) until the next `recv()` on that connection, so
 * no read starts, and no event can come, in between. That keeps them valid
 * (or until they are written, if you `send()` them), and lets READ interest
 * stay on from one `recv()` to the next instead of being dropped and
 * registered again on every message. It goes after EOF, an error or an
 * interrupted wait.
 *
 * @example An echo server with coroutines, and one client to try it
 * ```ts
 * import { AsyncLoop, type Connection } from "./async_loop.ts";
 * import { assertEquals } from "@std/assert";
 *
 * const loop = new AsyncLoop();
 *
 * async function handle(conn: Connection) {
 *   for (let data; (data = await loop.recv(conn)) !== null;) {
 *     await loop.send(conn, data); // waits only while the peer does not read
 *   }
 *   await loop.close(conn); // writes back what is queued, then closes
 * }
 *
 * async function serve(listener: Deno.Listener) {
 *   for (;;) loop.spawn(handle(await loop.accept(listener)));
 * }
 *
 * const listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
 * loop.spawn(serve(listener));
 * const running = loop.run();
 *
 * // One client: send "hello", say we are done, read the echo until EOF.
 * const conn = await Deno.connect({ hostname: "127.0.0.1", port: listener.addr.port });
 * await conn.write(new TextEncoder().encode("hello"));
 * await conn.closeWrite();
 * const reply = new Uint8Array(64);
 * let got = 0;
 * for (let n; (n = await conn.read(reply.subarray(got))) !== null;) got += n;
 * conn.close();
 * assertEquals(new TextDecoder().decode(reply.subarray(0, got)), "hello");
 *
 * loop.stop(); // closes the listener: the waiting accept() is interrupted
 * await running;
 * ```
 *
 * @module
 */

import {
  type BaseSelector,
  type ConnResource,
  type DatagramResource,
  type ListenerResource,
  READ,
  type Resource,
  Selector,
  type SelectorKey,
  WRITE,
} from "./loop.ts";

/** A connection served by coroutines: pass it to the loop's recv(), send() and close(). */
export interface Connection<T = unknown> {
  /** The connection itself, for its addresses and options (do not read or write it directly). */
  readonly resource: ConnResource;
  /** Bytes queued by send() and not yet written. */
  readonly queued: number;
  /** The error that ended the connection, if one did (a reset, a broken pipe...). */
  readonly error: Error | undefined;
  /** Anything you attach to the connection. */
  data: T;
}

/** A datagram (UDP) socket served by coroutines: pass it to the loop's recvfrom() and sendto(). */
export interface DatagramSocket<T = unknown> {
  /** The socket itself, for its address (do not receive or send on it directly). */
  readonly resource: DatagramResource;
  /** Bytes queued by sendto() and not yet sent. */
  readonly queued: number;
  /** The error that ended the socket, if one did. */
  readonly error: Error | undefined;
  /** Anything you attach to the socket. */
  data: T;
}

/**
 * What a coroutine resumes with, for a trace: bytes, `null` at EOF, an error,
 * the key of the connection it accepted, a datagram and its sender, or
 * "written" when the queue a send waited for is written.
 */
export type WakeResult =
  | Uint8Array
  | null
  | Error
  | SelectorKey
  | [Uint8Array, Deno.Addr]
  | "written";

/** One wake-up, for {@linkcode AsyncLoopOptions.trace}: a coroutine waiting in `call` on `key` resumes. */
export interface WakeEvent {
  /** Always "wake". */
  step: "wake";
  /** The key of the resource the coroutine waited on. */
  key: SelectorKey;
  /** What it waited in: `accept`, `recv`, `recvfrom` or `send`. */
  call: string;
  /** What it resumes with. */
  result: WakeResult;
}

/** Options for {@linkcode AsyncLoop}. */
export interface AsyncLoopOptions {
  /**
   * The selector to run on (loop.ts's, epoll.ts's...), shared with callback
   * code if you like. @default {new Selector()}
   */
  selector?: BaseSelector;
  /** Called each time a coroutine is woken, to watch it work; off by default. */
  trace?: (event: WakeEvent) => void;
  /**
   * What to do with an error a spawned coroutine threw. @default prints it on stderr
   */
  onError?: (error: unknown) => void;
}

/** One promise for every send() that need not wait: no allocation per call. */
const SENT = Promise.resolve();

/** The selector callback of every connection and listener: the loop's side of each await. */
function dispatch(key: SelectorKey<Waiters>, mask: number): void {
  key.data.ready(mask);
}

/** A Settler's resolve and reject before its first promise: nothing to settle yet. */
function unsettled(): void {}

/**
 * One promise at a time whose resolve and reject are kept for the selector's
 * dispatch to call. One executor serves every Settler (it runs inside `new
 * Promise`, for the Settler that asked), so a Settler and its promises cost no
 * closure of ours: an idle connection holds two Settlers.
 */
class Settler<T> {
  resolve: (value: T) => void = unsettled;
  reject: (error: Error) => void = unsettled;
  /** The Settler whose promise is being made, for the shared executor. */
  static #making: { resolve: (value: never) => void; reject: (error: Error) => void } | undefined;
  static readonly #executor = (
    resolve: (value: never) => void,
    reject: (error: Error) => void,
  ): void => {
    Settler.#making!.resolve = resolve;
    Settler.#making!.reject = reject;
  };

  /** A new promise, settled by the next resolve() or reject(). */
  promise(): Promise<T> {
    Settler.#making = this;
    const promise = new Promise<T>(Settler.#executor);
    Settler.#making = undefined;
    return promise;
  }
}

/** What waits on one registered resource, and the interest that follows it. */
abstract class Waiters {
  /** The key in the selector; its data is this object. */
  key!: SelectorKey<Waiters>;
  /** The interest registered now: changed only when it differs, to save a modify(). */
  #events = 0;
  /** False once closed or aborted: nothing may wait on it any more. */
  open = true;

  constructor(
    /** The selector the resource is registered with. */
    readonly selector: BaseSelector,
    /** The loop's trace function, if any. */
    readonly trace: ((event: WakeEvent) => void) | undefined,
  ) {}

  /** Called by the selector's dispatch with the ready events. */
  abstract ready(mask: number): void;
  /** The events some coroutine waits for now. */
  abstract wanted(): number;
  /** Rejects every waiting coroutine with `error`. */
  abstract rejectAll(error: Error): void;

  /** Registers interest in exactly the events waited for. */
  follow(): void {
    if (!this.open) return; // unregistered, or about to be
    const events = this.wanted();
    if (events === this.#events) return;
    this.#events = events;
    this.selector.modify(this.key.resource, events);
  }
}

/** A listener's waiters: at most one accept() at a time. */
class ListenerWaiters extends Waiters {
  /** True while an accept() waits. */
  #waiting = false;
  /** Settles the waiting accept(). */
  readonly #acceptSettler = new Settler<Connection>();
  /** Makes the connections it accepts. */
  readonly #adopt: (conn: ConnResource) => Connection;

  constructor(
    selector: BaseSelector,
    trace: ((event: WakeEvent) => void) | undefined,
    adopt: (conn: ConnResource) => Connection,
  ) {
    super(selector, trace);
    this.#adopt = adopt;
  }

  accept(): Promise<Connection> {
    if (this.#waiting) {
      return Promise.reject(new Error("accept() is already waiting on this listener"));
    }
    const accepted = this.#acceptSettler.promise();
    this.#waiting = true;
    this.follow();
    return accepted;
  }

  wanted(): number {
    return this.#waiting ? READ : 0;
  }

  ready(_mask: number): void {
    this.#waiting = false;
    this.follow();
    let conn: ConnResource;
    try {
      conn = this.key.accept(); // should be ready
    } catch (error) {
      this.trace?.({ step: "wake", key: this.key, call: "accept", result: error as Error });
      return this.#acceptSettler.reject(error as Error);
    }
    const connection = this.#adopt(conn);
    const result = (connection as ConnectionWaiters).key;
    this.trace?.({ step: "wake", key: this.key, call: "accept", result });
    this.#acceptSettler.resolve(connection);
  }

  rejectAll(error: Error): void {
    if (!this.#waiting) return;
    this.#waiting = false;
    this.#acceptSettler.reject(error);
  }
}

/**
 * What waits on a connection or datagram socket: at most one receive (recv()
 * or recvfrom()), and any number of sends waiting for the queue to drain.
 * `T` is what a receive gives.
 */
abstract class IoWaiters<T> extends Waiters {
  /** The user's data (see Connection). */
  data: unknown = undefined;
  /** The name of the receive call, for errors and traces. */
  abstract readonly call: string;
  /** True while a receive waits. */
  #receiving = false;
  /** True after a receive got bytes: the next one is due, and READ interest stays. */
  #expecting = false;
  /** Settles the waiting receive. */
  readonly #receiveSettler = new Settler<T>();
  /** The promise every send or drain waiting for the queue to empty shares, if any. */
  #drain: Promise<void> | undefined = undefined;
  /** Settles the drain promise. */
  readonly #drainSettler = new Settler<void>();

  /** Takes what the key received: it is READ-ready. */
  abstract take(): T;
  /** Whether `value` holds bytes of the key's buffer, to retain until the next receive. */
  abstract holdsBytes(value: T): boolean;

  get queued(): number {
    return this.key.queued;
  }

  get error(): Error | undefined {
    return this.key.error;
  }

  receive(): Promise<T> {
    if (!this.open) return Promise.reject(closedError(`${this.call}()`));
    if (this.#receiving) {
      return Promise.reject(new Error(`${this.call}() is already waiting here`));
    }
    const received = this.#receiveSettler.promise();
    this.#receiving = true;
    this.key.release(); // the bytes of the last receive may be overwritten now
    this.follow();
    return received;
  }

  /** Resolves at once (one shared promise) within the high-water mark, else when written. */
  sent(): Promise<void> {
    return this.key.queued > this.selector.highWaterMark ? this.drain() : SENT;
  }

  drain(): Promise<void> {
    if (!this.open) return Promise.reject(closedError("drain()"));
    if (this.key.error) return Promise.reject(this.key.error);
    if (this.key.queued === 0) return SENT;
    if (this.#drain) return this.#drain; // several may wait for the same queue
    this.#drain = this.#drainSettler.promise();
    this.#drain.catch(() => {}); // a send nobody awaits must not end the process if it fails
    this.follow();
    return this.#drain;
  }

  /**
   * READ while a receive waits, and also after it got bytes, when the next
   * receive is due: those bytes are retained, so no read can start (and no
   * event come) before it. After EOF or an error, and once waits are
   * interrupted, READ goes, since those stay ready and nobody may ask again.
   */
  wanted(): number {
    return (this.#receiving || this.#expecting ? READ : 0) | (this.#drain ? WRITE : 0);
  }

  ready(mask: number): void {
    if (this.#receiving && mask & READ) this.#received();
    if (this.#drain && mask & WRITE) this.#drained();
  }

  #received(): void {
    this.#receiving = false;
    let value: T;
    try {
      value = this.take(); // should be ready
    } catch (error) {
      this.#expecting = false;
      this.follow();
      this.trace?.({ step: "wake", key: this.key, call: this.call, result: error as Error });
      return this.#receiveSettler.reject(error as Error);
    }
    // No read into the bytes before the next receive: they stay valid.
    this.#expecting = this.holdsBytes(value);
    if (this.#expecting) this.key.retain();
    this.follow();
    this.trace?.({ step: "wake", key: this.key, call: this.call, result: value as WakeResult });
    this.#receiveSettler.resolve(value);
  }

  #drained(): void {
    this.#drain = undefined;
    this.follow();
    const { error } = this.key;
    this.trace?.({ step: "wake", key: this.key, call: "send", result: error ?? "written" });
    if (error) this.#drainSettler.reject(error);
    else this.#drainSettler.resolve();
  }

  /** Rejects a waiting receive with `error`. */
  rejectReceive(error: Error): void {
    this.#expecting = false;
    if (this.#receiving) {
      this.#receiving = false;
      this.#receiveSettler.reject(error);
    }
    this.follow();
  }

  rejectAll(error: Error): void {
    this.rejectReceive(error);
    if (!this.#drain) return;
    this.#drain = undefined;
    this.#drainSettler.reject(error);
    this.follow();
  }
}

/** A connection's waiters: recv() gives bytes, or null at EOF. */
class ConnectionWaiters extends IoWaiters<Uint8Array | null> implements Connection {
  readonly call = "recv";

  get resource(): ConnResource {
    return this.key.resource as ConnResource;
  }

  take(): Uint8Array | null {
    return this.key.recv();
  }

  holdsBytes(data: Uint8Array | null): boolean {
    return data !== null;
  }

  send(bytes: Uint8Array): Promise<void> {
    if (!this.open) return Promise.reject(closedError("send()"));
    try {
      this.key.send(bytes);
    } catch (error) {
      return Promise.reject(error);
    }
    return this.sent();
  }
}

/** A datagram socket's waiters: recvfrom() gives a datagram and its sender. */
class DatagramWaiters extends IoWaiters<[Uint8Array, Deno.Addr]> implements DatagramSocket {
  readonly call = "recvfrom";

  get resource(): DatagramResource {
    return this.key.resource as DatagramResource;
  }

  take(): [Uint8Array, Deno.Addr] {
    return this.key.recvfrom();
  }

  holdsBytes(): boolean {
    return true;
  }

  sendto(bytes: Uint8Array, addr: Deno.Addr): Promise<void> {
    if (!this.open) return Promise.reject(closedError("sendto()"));
    try {
      this.key.sendto(bytes, addr);
    } catch (error) {
      return Promise.reject(error);
    }
    return this.sent();
  }
}

/** The waiters behind a handle: every Connection and DatagramSocket is one. */
function waitersOf(handle: Connection | DatagramSocket): IoWaiters<unknown> {
  return handle as unknown as IoWaiters<unknown>;
}

function closedError(call: string): Error {
  return new Deno.errors.BadResource(`${call} on a closed connection`);
}

function interrupted(why: string): Error {
  return new Deno.errors.Interrupted(why);
}

/**
 * Coroutines on a {@linkcode Selector}: promise-returning accept, recv and
 * send, resolved from the selector's dispatch. See the module documentation.
 */
export class AsyncLoop {
  /** The selector it runs on. */
  readonly selector: BaseSelector;
  /** The trace function of the options, if any. */
  readonly #trace: ((event: WakeEvent) => void) | undefined;
  /** Every registered resource's waiters, to reject them when the loop stops. */
  readonly #registered = new Set<Waiters>();
  /** What handles a spawned coroutine's error. */
  readonly #onError: (error: unknown) => void;
  /** True once stop() was called or run() ended. */
  #stopped = false;

  /**
   * Creates a loop.
   *
   * @param options The selector to share, and an error handler for spawned coroutines.
   */
  constructor(options: AsyncLoopOptions = {}) {
    this.selector = options.selector ?? new Selector();
    this.#trace = options.trace;
    this.#onError = options.onError ??
      ((error) => console.error(`a coroutine failed: ${error}`));
  }

  /**
   * Waits for a connection on a listener (asyncio's `loop.sock_accept`).
   *
   * @param listener The listener; registered with the selector on first use.
   * @returns The accepted connection, registered too.
   * @throws What accepting failed with (e.g. "Too many open files": call again,
   *   loop.ts backs off); `Deno.errors.Interrupted` when the loop stops.
   */
  accept(listener: ListenerResource): Promise<Connection> {
    let waiters = this.selector.getKey(listener)?.data as ListenerWaiters | undefined;
    if (!waiters) {
      if (this.#stopped) return Promise.reject(interrupted("the loop is stopped"));
      waiters = new ListenerWaiters(this.selector, this.#trace, this.#adopt);
      this.#register(waiters, listener);
    }
    return waiters.accept();
  }

  /**
   * Registers a connection that was not accepted by this loop, e.g. from
   * `Deno.connect()`, or a datagram socket from `Deno.listenDatagram()`.
   *
   * @param resource The connection or socket.
   * @returns It, ready for recv() and send(), or recvfrom() and sendto().
   */
  adopt(resource: ConnResource): Connection;
  /**
   * Registers a datagram socket from `Deno.listenDatagram()`.
   *
   * @param resource The socket.
   * @returns It, ready for recvfrom() and sendto().
   */
  adopt(resource: DatagramResource): DatagramSocket;
  adopt(resource: ConnResource | DatagramResource): Connection | DatagramSocket {
    if ("remoteAddr" in resource) return this.#adopt(resource);
    const waiters = new DatagramWaiters(this.selector, this.#trace);
    this.#register(waiters, resource);
    return waiters;
  }

  /**
   * Waits for bytes (asyncio's `loop.sock_recv`). They stay valid until the
   * next recv() on this connection, or until written if you send() them; use
   * `slice()` to keep them longer.
   *
   * @param conn The connection.
   * @returns The bytes, or `null` once the peer has finished sending (EOF).
   * @throws The error the connection failed with (`Deno.errors.ConnectionReset`...);
   *   `Deno.errors.Interrupted` if it is closed or interrupted meanwhile, or the loop stops;
   *   an Error if another recv() already waits on it.
   */
  recv(conn: Connection): Promise<Uint8Array | null> {
    return (conn as ConnectionWaiters).receive();
  }

  /**
   * Queues bytes to be written, every one, in order (asyncio's
   * `loop.sock_sendall`). Resolves at once while the connection's queue is
   * within the high-water mark; otherwise waits until the queue is written.
   * Do not modify the bytes until they are written.
   *
   * @param conn The connection.
   * @param bytes The bytes.
   * @throws The error the connection failed with; `Deno.errors.Interrupted` as for recv().
   */
  send(conn: Connection, bytes: Uint8Array): Promise<void> {
    return (conn as ConnectionWaiters).send(bytes);
  }

  /**
   * Waits for a datagram (asyncio's `loop.sock_recvfrom`). Its bytes stay
   * valid until the next recvfrom() on this socket, or until sent.
   *
   * @param socket The datagram socket.
   * @returns The datagram, whole (possibly empty), and the address it came from.
   * @throws `Deno.errors.Interrupted` if the socket is closed or interrupted, or the loop
   *   stops; an error receiving failed with (call again); an Error if another waits.
   */
  recvfrom(socket: DatagramSocket): Promise<[Uint8Array, Deno.Addr]> {
    return (socket as DatagramWaiters).receive();
  }

  /**
   * Queues a datagram for `addr` (asyncio's `loop.sock_sendto`); one the
   * kernel refuses is dropped. Resolves as send() does.
   *
   * @param socket The datagram socket.
   * @param bytes The datagram.
   * @param addr Where to send it.
   */
  sendto(socket: DatagramSocket, bytes: Uint8Array, addr: Deno.Addr): Promise<void> {
    return (socket as DatagramWaiters).sendto(bytes, addr);
  }

  /**
   * Waits until everything queued is written (asyncio's `writer.drain()`).
   *
   * @param conn The connection or datagram socket.
   * @throws The error it failed with; `Deno.errors.Interrupted` as for recv().
   */
  drain(conn: Connection | DatagramSocket): Promise<void> {
    return waitersOf(conn).drain();
  }

  /**
   * Rejects what waits on a connection or datagram socket (a receive, a send,
   * a drain) with `Deno.errors.Interrupted`; it stays open.
   *
   * @param conn The connection or datagram socket.
   */
  interrupt(conn: Connection | DatagramSocket): void {
    waitersOf(conn).rejectAll(interrupted("interrupted"));
  }

  /**
   * Writes back what is queued, then closes the connection or socket. A
   * receive another coroutine waits in is interrupted; a waiting send resolves
   * once its bytes are written, as it would have.
   *
   * @param conn The connection or datagram socket.
   */
  async close(conn: Connection | DatagramSocket): Promise<void> {
    const waiters = waitersOf(conn);
    if (!waiters.open) return;
    waiters.rejectReceive(interrupted("closing"));
    try {
      await waiters.drain();
    } catch {
      // nothing more can be written: close anyway
    }
    this.abort(conn);
  }

  /**
   * Closes a connection or datagram socket now, dropping what is queued, or a
   * listener; what waits on it is interrupted.
   *
   * @param conn The connection, datagram socket or listener.
   */
  abort(conn: Connection | DatagramSocket | ListenerResource): void {
    const waiters = "data" in conn
      ? waitersOf(conn)
      : this.selector.getKey(conn)?.data as Waiters | undefined;
    const resource = waiters?.key.resource ?? conn as ListenerResource;
    if (waiters?.open) {
      waiters.open = false;
      waiters.rejectAll(interrupted("closed"));
      this.#registered.delete(waiters);
      this.selector.unregister(resource);
    }
    try {
      resource.close();
    } catch {
      // already closed
    }
  }

  /**
   * Runs a coroutine in the background (asyncio's `create_task`). An error it
   * throws goes to the loop's error handler, never to the top level, where it
   * would end the process; an Interrupted error after stop() is its normal end.
   *
   * @param task The coroutine, already started: `loop.spawn(handle(conn))`.
   */
  spawn(task: Promise<unknown>): void {
    task.catch(this.#failed);
  }

  /**
   * Runs the selector's loop (asyncio's `run_forever`) until stop() is called
   * or nothing is registered any more; then interrupts every coroutine still waiting.
   *
   * @returns A promise that settles when the loop ends.
   */
  async run(): Promise<void> {
    try {
      await this.selector.run();
    } finally {
      this.#stopAll();
    }
  }

  /** Stops the loop: closes the selector and every resource on it, and interrupts every waiter. */
  stop(): void {
    this.selector.close();
    this.#stopAll();
  }

  #stopAll(): void {
    this.#stopped = true;
    const error = interrupted("the loop is stopped");
    for (const waiters of this.#registered) {
      waiters.open = false;
      waiters.rejectAll(error);
    }
    this.#registered.clear();
  }

  #register(waiters: Waiters, resource: Resource): void {
    waiters.key = this.selector.register(resource, 0, dispatch, waiters);
    this.#registered.add(waiters);
  }

  readonly #adopt = (conn: ConnResource): Connection => {
    const waiters = new ConnectionWaiters(this.selector, this.#trace);
    this.#register(waiters, conn);
    return waiters;
  };

  readonly #failed = (error: unknown): void => {
    if (this.#stopped && error instanceof Deno.errors.Interrupted) return;
    this.#onError(error);
  };
}
