/**
 * A readiness dispatcher for Deno, shaped like Python's `selectors` module:
 * register resources with the events you want, `select()` the ready ones, and
 * call their callbacks from one loop.
 *
 * Deno offers completions (promises), not readiness (epoll), so readiness is
 * built from completions. For each key the dispatcher keeps one operation in
 * flight: an `accept()` for a listener, a `read()` for a connection. When it
 * completes the key is ready, and the callback takes the result at once with
 * {@linkcode SelectorKey.accept} or {@linkcode SelectorKey.recv} ("should be
 * ready", as in the Python version). {@linkcode SelectorKey.send} queues bytes
 * and the dispatcher writes all of them, continuing partial writes itself.
 *
 * This file imports nothing: copy it into your project as it is.
 *
 * @example An echo server
 * ```ts ignore
 * import { READ, Selector, type SelectorKey, WRITE } from "./loop.ts";
 *
 * const selector = new Selector();
 *
 * function accept(key: SelectorKey) {
 *   const conn = key.accept(); // should be ready
 *   selector.register(conn, READ, read);
 * }
 *
 * function read(key: SelectorKey) {
 *   let data;
 *   try {
 *     data = key.recv(); // should be ready
 *   } catch {
 *     return close(key); // a reset: it ends this connection, not the server
 *   }
 *   if (data) key.send(data); // queued: the loop writes every byte
 *   else selector.modify(key.resource, WRITE, close); // EOF: close once written
 * }
 *
 * function close(key: SelectorKey) {
 *   selector.unregister(key.resource);
 *   key.resource.close();
 * }
 *
 * const listener = Deno.listen({ hostname: "127.0.0.1", port: 1234 });
 * selector.register(listener, READ, accept);
 * await selector.run(); // for each ready key: key.callback(key, mask)
 * ```
 *
 * @module
 */

/** Interest in, and readiness for, reading: an accepted connection or received bytes are waiting. */
export const READ = 1;
/** Interest in, and readiness for, writing: everything queued with `send()` has been written. */
export const WRITE = 2;

/** What can be registered: a listener (READ only) or a connection. */
export type Resource = Deno.Listener | Deno.Conn;

/** Called by {@linkcode Selector.run} for each ready key, with the ready events. */
export type Callback<T = unknown> = (key: SelectorKey<T>, mask: number) => void;

/** One `[key, mask]` pair of a {@linkcode Selector.select} result. */
export type ReadyEvent = [key: SelectorKey, mask: number];

/** A registered resource: what it is, what it waits for, and its I/O. */
export interface SelectorKey<T = unknown> {
  /** The registered listener or connection (Python's `fileobj`). */
  readonly resource: Resource;
  /** The events of interest: a mix of {@linkcode READ} and {@linkcode WRITE}. */
  readonly events: number;
  /**
   * The function {@linkcode Selector.run} calls when the key is ready. (Declared
   * as a method so that any key is a `SelectorKey<unknown>`.)
   */
  callback(key: SelectorKey<T>, mask: number): void;
  /** Anything you attach to the key. */
  data: T;
  /** Bytes queued by `send()` and not yet written. */
  readonly queued: number;
  /** The error that ended this connection, if one did (a reset, a broken pipe...). */
  readonly error: Error | undefined;
  /**
   * Takes the connection a listener key accepted. Call it when the key is READ-ready.
   *
   * @returns The accepted connection.
   * @throws The error the accept failed with (e.g. "Too many open files"); the
   *   dispatcher retries, backing off while the process is out of descriptors.
   *   A peer that left before it was accepted is skipped, never reported.
   */
  accept(): Deno.Conn;
  /**
   * Takes the bytes a connection key received. Call it when the key is READ-ready.
   * The bytes stay valid until the next `select()`, or until they are written if
   * you `send()` them (on any key); use `slice()` to keep them longer.
   *
   * @returns The bytes, or `null` once the peer has finished sending (EOF).
   * @throws The error the connection failed with (`Deno.errors.ConnectionReset`...).
   */
  recv(): Uint8Array | null;
  /**
   * Queues bytes to be written; the dispatcher writes every one of them, in order.
   * Do not modify them until they are written. While more than the high-water
   * mark is queued, reading pauses; it resumes at the low-water mark.
   *
   * @param bytes The bytes to write.
   * @throws The error the connection failed with, if it failed.
   */
  send(bytes: Uint8Array): void;
}

/** Options for {@linkcode Selector}. */
export interface SelectorOptions {
  /** Queued bytes above which a connection stops reading. @default {65536} */
  highWaterMark?: number;
  /** Queued bytes at or below which it reads again. @default {16384} */
  lowWaterMark?: number;
}

/** The smallest and largest read buffers; an idle connection waits on the smallest. */
const MIN_READ = 256;
const MAX_READ = 64 * 1024;
/** Back-off between accepts while the process is out of file descriptors. */
const MIN_BACKOFF_MS = 10;
const MAX_BACKOFF_MS = 500;
/** A read pending this long, overtaken by this many others, is starving: see Scheduler. */
const STARVING_MS = 20;
const STARVING_OVERTAKEN = 128;
/** The longest a hold of new reads lasts. */
const HOLD_MAX_MS = 50;
/** During a hold, one held read starts per ADMIT_EVERY starving reads served. */
const ADMIT_EVERY = 2;
/** A read that outlasts holds is watched again with patience STARVING_MS << 1, 2, ... 12. */
const PATIENCE_LEVELS = 13;

/** Accept errors caused by a peer that left before we accepted it: not reported, retried at once. */
function peerLeft(error: unknown): boolean {
  return error instanceof Deno.errors.NotConnected ||
    error instanceof Deno.errors.ConnectionAborted ||
    error instanceof Deno.errors.ConnectionReset;
}

/** Errors that mean the resource itself is gone (closed): never retry. */
function resourceGone(error: unknown): boolean {
  return error instanceof Deno.errors.BadResource ||
    error instanceof Deno.errors.Interrupted;
}

/** Checks an interest mask: READ and WRITE bits only, READ only for a listener. */
function checkEvents(resource: Resource, events: number): number {
  const isConn = "read" in resource;
  const valid = isConn ? READ | WRITE : READ;
  if (!Number.isInteger(events) || (events & ~valid) !== 0) {
    throw new RangeError(
      `Invalid events ${events}: a ${
        isConn ? "connection takes READ and WRITE" : "listener takes READ"
      }`,
    );
  }
  return events;
}

/** Which key lent its read buffer: `send()` of those bytes holds that key's reads. */
const lenders = new WeakMap<ArrayBufferLike, ConnKey>();

/** Reads started in the same millisecond, watched together for starvation. */
class Cohort {
  /** performance.now() when its first read started. */
  readonly started: number;
  /** How many of its reads are still pending. */
  pending = 0;
  /** performance.now() from which a read still pending is starving, if others overtook it. */
  due: number;
  /** How many reads had completed (anywhere) when it was last watched. */
  completed: number;
  /** How many holds it has outlasted: it is watched with patience STARVING_MS << patience. */
  patience = 0;
  /** True while a hold waits for its pending reads. */
  owed = false;

  constructor(started: number, completed: number) {
    this.started = started;
    this.due = started + STARVING_MS;
    this.completed = completed;
  }
}

/** Cohorts with pending reads, in the order they are due (one list per patience). */
class Watchlist {
  #cohorts: Cohort[] = [];
  #head = 0;

  add(cohort: Cohort): void {
    this.#cohorts.push(cohort);
  }

  /** The first cohort with reads pending, if any. */
  first(): Cohort | undefined {
    const cohorts = this.#cohorts;
    let head = this.#head;
    while (head < cohorts.length && cohorts[head].pending === 0) head++;
    if (head > 1024 && head * 2 > cohorts.length) { // compact now and then
      cohorts.splice(0, head);
      head = 0;
    }
    this.#head = head;
    return cohorts[head];
  }

  /** Moves the cohorts due at `now` that still have reads pending into `into`. */
  takeDue(now: number, into: Cohort[]): void {
    const cohorts = this.#cohorts;
    let head = this.#head;
    for (; head < cohorts.length && cohorts[head].due <= now; head++) {
      if (cohorts[head].pending > 0) into.push(cohorts[head]);
    }
    this.#head = head;
  }
}

/**
 * The machinery every key of a selector shares: the ready list, the wake-up of
 * the waiting select(), and fairness between connections.
 *
 * Fairness: when a server saturates its core, Deno (tokio under it) serves the
 * reads whose data arrived last before those it had to postpone, so a few hundred
 * busy connections can starve the others for seconds although their bytes have
 * arrived. No order of callbacks in JS fixes that; holding new reads does. So the
 * scheduler watches the reads it starts, and when one has been pending for
 * STARVING_MS while STARVING_OVERTAKEN others completed, it holds new reads
 * (dispatch goes on) until the runtime has worked through the pending ones.
 * During a hold, one held read starts per ADMIT_EVERY starving reads served:
 * the runtime then gets less new work than it completes, so the backlog drains
 * while the pipeline stays busy.
 */
class Scheduler {
  readonly highWaterMark: number;
  readonly lowWaterMark: number;
  /** performance.now() when select() last returned: the start time of reads begun since. */
  now = 0;
  #ready: Key[] = []; // keys that may be ready, each once
  #spare: Key[] = []; // the previous ready array, reused
  #held: Key[] = []; // keys reported (or recv()'d) since the last select()
  #wake: (() => void) | undefined = undefined; // resolves the waiting select()
  // Watched cohorts of reads by patience: STARVING_MS << n.
  #watchlists = Array.from({ length: PATIENCE_LEVELS }, () => new Watchlist());
  #cohort: Cohort | undefined = undefined; // the cohort reads started now join
  #completed = 0; // reads completed so far
  #inFlight = 0; // reads started and not completed
  #writes = 0; // writes completed so far
  // While holding:
  #deferred: ConnKey[] | undefined = undefined; // keys waiting to read
  #deferredHead = 0; // #deferred[#deferredHead...] have not started their read
  #allowance = 0; // held keys that may read now
  #owed: Cohort[] = []; // the starving reads the hold waits for
  #owing = 0; // how many of them are still pending
  #holdDeadline = 0; // performance.now() at which the hold ends anyway
  #holdSeen = -1; // reads and writes completed at the previous timer tick
  #holdTimer: ReturnType<typeof setTimeout> | undefined = undefined;
  #nextCheck = 0; // performance.now() of the next fairness check

  constructor(highWaterMark: number, lowWaterMark: number) {
    this.highWaterMark = highWaterMark;
    this.lowWaterMark = lowWaterMark;
  }

  get readyCount(): number {
    return this.#ready.length;
  }

  /** Lists a key that may be ready, and wakes select(); returns whether it was added. */
  list(key: Key): boolean {
    if (key.listed || !key.registered || !(key.readiness & key.events)) return false;
    key.listed = true;
    this.#ready.push(key);
    this.wakeUp();
    return true;
  }

  /** Keeps a key's read buffer untouched until the next select(). */
  hold(key: Key): void {
    key.held = true;
    this.#held.push(key);
  }

  /** Releases the keys held since the last select(); returns how many are still ready. */
  release(): number {
    let relisted = 0;
    for (const key of this.#held) if (key.release()) relisted++;
    this.#held.length = 0;
    return relisted;
  }

  /** Says whether a key may start a read now; if not, it reads later in the hold or after it. */
  mayRead(key: ConnKey): boolean {
    if (this.#deferred) {
      if (this.#allowance === 0) {
        this.#deferred.push(key);
        return false;
      }
      this.#allowance--;
    }
    // Deno defers reads only when more are ready at once than its budget (128) allows:
    // with fewer in flight none can starve, and watching them would only cost time.
    if (++this.#inFlight > STARVING_OVERTAKEN) {
      let cohort = this.#cohort;
      if (!cohort || this.now - cohort.started >= 1) {
        this.#cohort = cohort = new Cohort(this.now, this.#completed);
        this.#watchlists[0].add(cohort);
      }
      cohort.pending++;
      key.cohort = cohort;
    }
    return true;
  }

  /** Counts a read that completed (or failed). */
  readDone(key: ConnKey): void {
    this.#inFlight--;
    this.#completed++;
    const cohort = key.cohort;
    if (!cohort) return;
    key.cohort = undefined;
    cohort.pending--;
    if (cohort.owed) {
      // All served: end the hold now, not at the next timer tick (the CPU could idle till then).
      if (--this.#owing === 0) queueMicrotask(this.#endHold);
      else if (this.#owing % ADMIT_EVERY === 0) this.#admitOne();
    }
  }

  /** Counts a write that completed: a read may wait for its peer, which waits for it. */
  writeDone(): void {
    this.#writes++;
  }

  /**
   * If reads are starving, holds new reads (dispatch goes on, and some held reads
   * start, see #admitOne) until the runtime has served them: until they complete,
   * a whole timer interval passes with no read or write completing (the rest are
   * idle peers), or HOLD_MAX_MS.
   *
   * A read still pending after a hold is watched again with twice the patience,
   * so an idle peer costs a few short holds over its lifetime, not one per tick.
   */
  checkFairness(): void {
    const { now } = this;
    if (this.#deferred || now < this.#nextCheck) return;
    this.#nextCheck = now + 1; // a millisecond is fine enough, and keeps this off the hot path
    const completed = this.#completed;
    const starving = this.#watchlists.some((list) => {
      const first = list.first();
      return first !== undefined && first.due <= now &&
        completed - first.completed > STARVING_OVERTAKEN;
    });
    if (!starving) return;
    const owed: Cohort[] = [];
    for (const list of this.#watchlists) list.takeDue(now, owed);
    let owing = 0;
    for (const cohort of owed) {
      cohort.owed = true;
      owing += cohort.pending;
    }
    this.#owed = owed;
    this.#owing = owing;
    this.#deferred = [];
    this.#deferredHead = 0;
    this.#holdDeadline = now + HOLD_MAX_MS;
    this.#holdSeen = -1;
    this.#holdTimer = setTimeout(this.#holdTick, 0);
  }

  /**
   * A timer tick during a hold. Deno runs timers before it delivers the tick's
   * I/O, so a stall (no progress) is judged over a whole timer interval.
   */
  #holdTick = (): void => {
    const progress = this.#completed + this.#writes;
    if (progress === this.#holdSeen || performance.now() >= this.#holdDeadline) {
      return this.#endHold();
    }
    this.#holdSeen = progress;
    this.#holdTimer = setTimeout(this.#holdTick, 0);
  };

  /** During a hold: lets the next held key read (or the next key that asks). */
  #admitOne(): void {
    const deferred = this.#deferred!;
    this.#allowance++;
    while (this.#allowance > 0 && this.#deferredHead < deferred.length) {
      deferred[this.#deferredHead++].startInbound();
    }
  }

  /** Ends a hold: watches the reads still owed with more patience, starts the held ones. */
  #endHold = (): void => {
    const deferred = this.#deferred;
    if (!deferred) return;
    clearTimeout(this.#holdTimer);
    this.#holdTimer = undefined;
    const watchlists = this.#watchlists;
    const later = performance.now();
    for (const cohort of this.#owed) {
      cohort.owed = false;
      if (cohort.pending === 0) continue;
      cohort.patience = Math.min(cohort.patience + 1, watchlists.length - 1);
      cohort.due = later + (STARVING_MS << cohort.patience);
      cohort.completed = this.#completed;
      watchlists[cohort.patience].add(cohort);
    }
    this.#owed = [];
    this.#owing = 0;
    this.#deferred = undefined;
    this.#allowance = 0;
    for (let i = this.#deferredHead; i < deferred.length; i++) deferred[i].startInbound();
  };

  /** Ends a hold at once: the selector is closing (its keys, unregistered, start no reads). */
  stop(): void {
    this.#endHold();
  }

  /** Waits until a key is listed or the timeout passes (`undefined`: no timeout). */
  wait(timeout: number | undefined): Promise<void> {
    if (timeout === undefined) return new Promise<void>(this.#waitForever);
    return new Promise<void>((resolve) => {
      const timer = setTimeout(() => {
        this.#wake = undefined;
        resolve();
      }, timeout);
      this.#wake = () => {
        clearTimeout(timer);
        resolve();
      };
    });
  }

  #waitForever = (resolve: () => void): void => {
    this.#wake = resolve;
  };

  wakeUp(): void {
    const wake = this.#wake;
    this.#wake = undefined;
    wake?.();
  }

  /** Takes the listed keys that are ready: fills `events`, holds each key reported. */
  collect(events: ReadyEvent[]): ReadyEvent[] {
    this.now = performance.now();
    const ready = this.#ready;
    this.#ready = this.#spare;
    this.#spare = ready;
    events.length = 0;
    for (let i = 0; i < ready.length; i++) {
      const key = ready[i];
      key.listed = false;
      const mask = key.readiness & key.events;
      if (!key.registered || mask === 0) continue;
      key.event[1] = mask;
      events.push(key.event);
      if (!key.held) this.hold(key);
    }
    ready.length = 0;
    return events;
  }
}

// Keys of any data type live in one map; the public type is SelectorKey<T>.
// deno-lint-ignore no-explicit-any
type AnyData = any;

/** What listener and connection keys share; the implementation of SelectorKey. */
abstract class Key implements SelectorKey<AnyData> {
  readonly resource: Resource;
  events: number;
  callback: Callback<AnyData>;
  data: AnyData;
  error: Error | undefined = undefined;
  /** The `[key, mask]` pair select() reports for this key, reused. */
  readonly event: ReadyEvent;
  /** True while in the ready list (never listed twice). */
  listed = false;
  /** False once unregistered: late completions are then dropped. */
  registered = true;
  /** True from the select() that reported the key, or from recv(), to the next select(). */
  held = false;
  protected readonly scheduler: Scheduler;

  constructor(
    resource: Resource,
    events: number,
    callback: Callback<AnyData>,
    data: AnyData,
    scheduler: Scheduler,
  ) {
    this.resource = resource;
    this.events = events;
    this.callback = callback;
    this.data = data;
    this.scheduler = scheduler;
    this.event = [this, 0];
  }

  /** The events the key is ready for, whatever its interest. */
  abstract get readiness(): number;
  /** Starts the next accept or read if the key wants one and nothing holds it back. */
  abstract startInbound(): void;
  /** Drops everything pending; late completions are ignored from now on. */
  abstract cancel(): void;

  get queued(): number {
    return 0;
  }

  accept(): Deno.Conn {
    throw new TypeError("accept() needs a listener's key");
  }

  recv(): Uint8Array | null {
    throw new TypeError("recv() needs a connection's key");
  }

  send(_bytes: Uint8Array): void {
    throw new TypeError("send() needs a connection's key");
  }

  /**
   * Called by the next select(): the bytes recv() handed out may be reused now. A
   * key still ready (its callback did not take the result) is listed again, as a
   * level-triggered selector reports it again.
   *
   * @returns Whether the key was listed again.
   */
  release(): boolean {
    this.held = false;
    if (!this.registered) return false;
    this.startInbound();
    return this.scheduler.list(this);
  }
}

/** A listener's key: keeps one accept in flight, and backs off while out of descriptors. */
class ListenerKey extends Key {
  #inFlight = false;
  #accepted: Deno.Conn | null = null;
  #gone = false; // the listener was closed: accept no more
  #backoffMs = 0;
  #retryAt = 0; // performance.now() before which no accept is tried
  #retryTimer: ReturnType<typeof setTimeout> | undefined = undefined;

  get readiness(): number {
    return this.error || this.#accepted ? READ : 0;
  }

  override accept(): Deno.Conn {
    const conn = this.#accepted;
    this.#accepted = null;
    if (conn) return conn;
    const error = this.error;
    if (!this.#gone) this.error = undefined; // accept errors pass; the next accept may work
    throw error ?? new Deno.errors.WouldBlock("accept() before the key was ready");
  }

  startInbound(): void {
    if (
      this.#inFlight || !this.registered || !(this.events & READ) || this.error ||
      this.#accepted || this.#retryTimer
    ) return;
    const wait = this.#retryAt && this.#retryAt - performance.now();
    if (wait > 0) {
      this.#retryTimer = setTimeout(this.#retry, wait);
      return;
    }
    this.#inFlight = true;
    (this.resource as Deno.Listener).accept().then(this.#onAccept, this.#onAcceptError);
  }

  cancel(): void {
    this.registered = false;
    clearTimeout(this.#retryTimer);
    this.#retryTimer = undefined;
    this.#accepted?.close(); // accepted by us, never handed out
    this.#accepted = null;
  }

  #onAccept = (conn: Deno.Conn): void => {
    this.#inFlight = false;
    this.#backoffMs = 0;
    this.#retryAt = 0;
    if (!this.registered) return conn.close();
    this.#accepted = conn;
    this.scheduler.list(this);
  };

  #onAcceptError = (error: Error): void => {
    this.#inFlight = false;
    if (!this.registered) return;
    if (peerLeft(error)) return this.startInbound(); // nothing to report: accept the next one
    if (resourceGone(error)) this.#gone = true;
    else {
      // Out of descriptors, or similar: retrying at once would spin the CPU.
      this.#backoffMs = Math.min(MAX_BACKOFF_MS, Math.max(MIN_BACKOFF_MS, this.#backoffMs * 2));
      this.#retryAt = performance.now() + this.#backoffMs;
    }
    this.error = error;
    this.scheduler.list(this);
  };

  #retry = (): void => {
    this.#retryTimer = undefined;
    this.#retryAt = 0;
    this.startInbound();
  };
}

/** A connection's key: keeps one read in flight, and writes what send() queues. */
class ConnKey extends Key {
  /** The cohort its pending read is watched in, if it is (see Scheduler). */
  cohort: Cohort | undefined = undefined;
  // Inbound: one read in flight at a time.
  #reading = false;
  #received: number | null | undefined = undefined; // bytes in #buf, null at EOF
  #lent = 0; // chunks of #buf queued by send() on some key
  #buf: Uint8Array = new Uint8Array(0);
  #nextSize = MIN_READ;
  // Outbound.
  #chunks: (Uint8Array | undefined)[] = [];
  #head = 0;
  #queued = 0;
  #writing = false;
  #paused = false; // above the high-water mark until back at the low-water mark

  override get queued(): number {
    return this.#queued;
  }

  get readiness(): number {
    if (this.error) return READ | WRITE;
    return (this.#received !== undefined ? READ : 0) | (this.#queued === 0 ? WRITE : 0);
  }

  override recv(): Uint8Array | null {
    if (this.error) throw this.error;
    const n = this.#received;
    if (n === undefined) throw new Deno.errors.WouldBlock("recv() before the key was ready");
    if (n === null) return null; // EOF stays readable, as on a socket
    this.#received = undefined;
    if (!this.held) this.scheduler.hold(this); // the bytes are the caller's until select()
    return this.#buf.subarray(0, n);
  }

  override send(bytes: Uint8Array): void {
    if (this.error) throw this.error;
    if (!this.registered) throw new Deno.errors.BadResource("send() on an unregistered key");
    if (bytes.byteLength === 0) return;
    this.#lend(bytes, 1);
    this.#chunks.push(bytes);
    this.#queued += bytes.byteLength;
    if (this.#queued > this.scheduler.highWaterMark) this.#paused = true;
    if (!this.#writing) this.#write();
  }

  /** Counts chunks of this key's read buffer waiting in some send queue. */
  lent(delta: number): void {
    this.#lent += delta;
    if (this.#lent === 0) this.startInbound();
  }

  startInbound(): void {
    if (
      this.#reading || !this.registered || !(this.events & READ) || this.error ||
      this.#received !== undefined || this.held || this.#lent > 0 || this.#paused ||
      !this.scheduler.mayRead(this)
    ) return;
    if (this.#buf.byteLength !== this.#nextSize) {
      this.#buf = new Uint8Array(this.#nextSize);
      lenders.set(this.#buf.buffer, this);
    }
    this.#reading = true;
    (this.resource as Deno.Conn).read(this.#buf).then(this.#onRead, this.#onReadError);
  }

  cancel(): void {
    this.registered = false;
    // A chunk being written stays lent until its write completes.
    this.#dropQueue(this.#writing ? this.#head + 1 : this.#head);
  }

  #onRead = (n: number | null): void => {
    this.#reading = false;
    if (this.registered) {
      const size = this.#buf.byteLength;
      if (n === size) this.#nextSize = Math.min(MAX_READ, size * 4);
      else if (n !== null && n <= size / 16) this.#nextSize = MIN_READ;
      this.#received = n;
      this.scheduler.list(this);
    }
    this.scheduler.readDone(this); // last: it may start reads, and must not start ours
  };

  #onReadError = (error: Error): void => {
    this.#reading = false;
    if (this.registered) this.#fail(error);
    this.scheduler.readDone(this); // last, as in #onRead
  };

  #write(): void {
    this.#writing = true;
    (this.resource as Deno.Conn).write(this.#chunks[this.#head]!).then(
      this.#onWrite,
      this.#onWriteError,
    );
  }

  #onWrite = (n: number): void => {
    this.scheduler.writeDone();
    const chunk = this.#chunks[this.#head]!;
    if (!this.registered) return this.#lend(chunk, -1);
    this.#queued -= n;
    if (n < chunk.byteLength) {
      this.#chunks[this.#head] = chunk.subarray(n); // a partial write: go on with the rest
    } else {
      this.#chunks[this.#head++] = undefined;
      this.#lend(chunk, -1);
    }
    if (this.#paused && this.#queued <= this.scheduler.lowWaterMark) {
      this.#paused = false;
      this.startInbound();
    }
    if (this.#head < this.#chunks.length) return this.#write();
    this.#chunks.length = 0;
    this.#head = 0;
    this.#writing = false;
    if (this.events & WRITE) this.scheduler.list(this);
  };

  #onWriteError = (error: Error): void => {
    this.#writing = false;
    if (!this.registered) return this.#lend(this.#chunks[this.#head]!, -1);
    this.#dropQueue(this.#head); // nothing more can be written
    this.#fail(error);
  };

  /** Tells the key whose read buffer `bytes` come from that they are (+1) or no longer (-1) queued. */
  #lend(bytes: Uint8Array, delta: number): void {
    if (bytes.buffer === this.#buf.buffer) this.lent(delta); // an echo: our own buffer
    else lenders.get(bytes.buffer)?.lent(delta);
  }

  /** Empties the send queue, returning lent buffers from chunk `from` on. */
  #dropQueue(from: number): void {
    for (let i = from; i < this.#chunks.length; i++) this.#lend(this.#chunks[i]!, -1);
    if (from === this.#head) this.#chunks = [];
    else this.#chunks.length = from; // keep the chunk being written
    this.#queued = 0;
  }

  #fail(error: Error): void {
    this.error ??= error;
    this.scheduler.list(this);
  }
}

/**
 * Waits for registered resources to become ready and dispatches their callbacks.
 *
 * Work per event is O(1) however many keys are registered: a completion lists
 * its key and wakes the one waiting `select()`.
 */
export class Selector {
  /** Queued bytes above which a connection stops reading. */
  readonly highWaterMark: number;
  /** Queued bytes at or below which it reads again. */
  readonly lowWaterMark: number;
  readonly #keys = new Map<Resource, Key>();
  readonly #scheduler: Scheduler;
  readonly #events: ReadyEvent[] = [];
  #selecting = false;
  #closed = false;

  /**
   * Creates a selector.
   *
   * @param options Backpressure thresholds for `send()`.
   */
  constructor(options: SelectorOptions = {}) {
    const { highWaterMark = 64 * 1024, lowWaterMark = 16 * 1024 } = options;
    if (!(lowWaterMark >= 0 && highWaterMark >= lowWaterMark)) {
      throw new RangeError(
        `Water marks must satisfy 0 <= low <= high: got low ${lowWaterMark}, high ${highWaterMark}`,
      );
    }
    this.highWaterMark = highWaterMark;
    this.lowWaterMark = lowWaterMark;
    this.#scheduler = new Scheduler(highWaterMark, lowWaterMark);
  }

  /** How many resources are registered. */
  get size(): number {
    return this.#keys.size;
  }

  /**
   * Starts watching a resource. With READ interest the dispatcher starts an
   * accept (listener) or a read (connection) right away.
   *
   * @param resource A listener or a connection.
   * @param events {@linkcode READ}, {@linkcode WRITE} (connections), both, or 0.
   * @param callback What {@linkcode Selector.run} calls when the key is ready.
   * @param data Anything to attach to the key.
   * @returns The new key.
   * @throws {Error} If the resource is already registered or the selector is closed.
   */
  register<T = undefined>(
    resource: Resource,
    events: number,
    callback: Callback<T>,
    data?: T,
  ): SelectorKey<T> {
    if (this.#closed) throw new Error("Cannot register: the selector is closed");
    if (this.#keys.has(resource)) {
      throw new Error("Cannot register: the resource is already registered");
    }
    const interest = checkEvents(resource, events);
    const key = "read" in resource
      ? new ConnKey(resource, interest, callback, data, this.#scheduler)
      : new ListenerKey(resource, interest, callback, data, this.#scheduler);
    this.#keys.set(resource, key);
    key.startInbound();
    this.#scheduler.list(key);
    return key;
  }

  /**
   * Changes a registered resource's interest, and its callback or data if given.
   * Interest 0 pauses it: nothing is reported and no new read or accept starts.
   *
   * @param resource A registered resource.
   * @param events The new interest.
   * @param callback The new callback; the old one is kept if omitted.
   * @param data The new data; the old data is kept if omitted.
   * @returns The key.
   * @throws {Error} If the resource is not registered.
   */
  modify<T = undefined>(
    resource: Resource,
    events: number,
    callback?: Callback<T>,
    data?: T,
  ): SelectorKey<T> {
    const key = this.#keyOf(resource);
    key.events = checkEvents(resource, events);
    if (callback) key.callback = callback;
    if (data !== undefined) key.data = data;
    key.startInbound();
    this.#scheduler.list(key);
    return key;
  }

  /**
   * Stops watching a resource and drops what is pending for it: an accepted
   * connection not yet taken, received bytes, bytes queued by `send()`. The
   * resource stays open: close it, which also ends the read or accept Deno
   * still has in flight for it.
   *
   * @param resource A registered resource.
   * @returns The key it had.
   * @throws {Error} If the resource is not registered.
   */
  unregister(resource: Resource): SelectorKey {
    const key = this.#keyOf(resource);
    this.#keys.delete(resource);
    key.cancel();
    if (this.#keys.size === 0) this.#scheduler.wakeUp(); // nothing left to wait for
    return key;
  }

  /**
   * The key of a registered resource.
   *
   * @param resource Any resource.
   * @returns Its key, or `undefined` if it is not registered.
   */
  getKey(resource: Resource): SelectorKey | undefined {
    return this.#keys.get(resource);
  }

  /**
   * Waits until at least one registered resource is ready, or the timeout passes.
   * A key stays ready until its callback takes the result (level-triggered).
   *
   * @param timeout Milliseconds to wait at most; 0 polls; omit to wait until
   *   something is ready (an empty selector returns at once).
   * @returns `[key, mask]` pairs, mask being the ready events of interest. The
   *   array and the pairs are reused by the next call.
   */
  async select(timeout?: number): Promise<ReadyEvent[]> {
    this.#enter();
    try {
      const waiting = this.#prepare(timeout);
      if (waiting) await waiting;
      return this.#scheduler.collect(this.#events);
    } finally {
      this.#selecting = false;
    }
  }

  /**
   * The loop: select, then call each ready key's callback with its mask, until
   * the selector is closed or no resource is left.
   *
   * @returns A promise that settles when the loop ends; it rejects if a callback throws.
   */
  async run(): Promise<void> {
    this.#enter();
    try {
      const events = this.#events;
      while (!this.#closed && this.#keys.size > 0) {
        const waiting = this.#prepare(undefined); // select(), without a promise of its own
        if (waiting) await waiting;
        this.#scheduler.collect(events);
        for (let i = 0; i < events.length; i++) {
          const key = events[i][0] as Key;
          if (key.registered) key.callback(key, events[i][1]);
        }
      }
    } finally {
      this.#selecting = false;
    }
  }

  /**
   * Unregisters and closes every resource (closing is the only way to end the
   * reads and accepts Deno has in flight), and ends `run()`.
   */
  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    for (const [resource, key] of this.#keys) {
      key.cancel();
      try {
        resource.close();
      } catch {
        // already closed by its owner
      }
    }
    this.#keys.clear();
    this.#scheduler.stop();
    this.#scheduler.wakeUp();
  }

  #enter(): void {
    if (this.#selecting) throw new Error("Cannot select: another select() is waiting");
    this.#selecting = true;
  }

  /** What select() does before it collects: returns what to wait for, if anything. */
  #prepare(timeout: number | undefined): Promise<unknown> | undefined {
    const scheduler = this.#scheduler;
    const relisted = scheduler.release();
    if (relisted > 0 && relisted === scheduler.readyCount) {
      // Only old events: let Deno poll I/O first, or this loop would starve it.
      return new Promise((resolve) => setTimeout(resolve, 0));
    }
    scheduler.checkFairness();
    if (scheduler.readyCount === 0 && !this.#closed && this.#keys.size > 0 && timeout !== 0) {
      return scheduler.wait(timeout);
    }
  }

  #keyOf(resource: Resource): Key {
    const key = this.#keys.get(resource);
    if (!key) throw new Error("The resource is not registered");
    return key;
  }
}
