/**
 * Fairness between connections when a process saturates its CPU: a plug-in
 * for loop.ts's Selector that holds back new reads while old ones starve.
 *
 * Why it exists. Deno runs every pending operation of a process in one task of
 * its runtime (tokio), and tokio lets one task complete at most 128 operations
 * per turn (its cooperative budget); the rest are deferred, and deferred wakers
 * run last-in first-out, after fresh I/O. So when a server saturates its core
 * and more than 128 reads are ready at once, the reads whose data arrived last
 * are served first, and a few hundred busy connections can starve the others
 * for seconds although their bytes have arrived. No order of callbacks in JS
 * fixes that (the starving reads are not in JS's hands); starting fewer new
 * reads does. A selector on real readiness (epoll.ts) needs none of this.
 *
 * What it does. The reads started while more than 128 are in flight are
 * counted in cohorts, one per millisecond. When a cohort's reads have been
 * pending for STARVING_MS while STARVING_OVERTAKEN other reads completed, new
 * reads are throttled: a key that wants to read is held back (dispatch goes
 * on), and one held key starts its read for every ADMIT_EVERY starving reads
 * served, so the runtime gets less new work than it completes and works off
 * its backlog. The throttle ends when the starving reads are served, when a
 * whole timer interval passes with no read or write completing (the rest are
 * idle peers), or after THROTTLE_MAX_MS. A cohort still pending after a
 * throttle is watched again with twice the patience, so an idle peer costs a
 * few short throttles over its lifetime, not one per millisecond.
 *
 * @example Attach it to a selector
 * ```ts
 * import { Selector } from "./loop.ts";
 * import { Fairness } from "./fairness.ts";
 *
 * const selector = new Selector({ readGate: new Fairness() });
 * selector.close();
 * ```
 *
 * @module
 */

import type { GatedRead, ReadGate } from "./loop.ts";

/** What {@linkcode Fairness} reports, for a trace: a throttle begins or ends. */
export type FairnessEvent =
  /** Reads are starving, so new reads are throttled until they are served. */
  | { step: "throttle"; starving: number }
  /** The throttle ends. */
  | { step: "unthrottle" };

/** Options for {@linkcode Fairness}. */
export interface FairnessOptions {
  /** Called when a throttle begins and ends, to watch it work. */
  trace?: (event: FairnessEvent) => void;
}

/** A read pending this long, overtaken by this many others, is starving. */
const STARVING_MS = 20;
const STARVING_OVERTAKEN = 128;
/** The longest a throttle lasts. */
const THROTTLE_MAX_MS = 50;
/** While throttling, one held read starts per ADMIT_EVERY starving reads served. */
const ADMIT_EVERY = 2;
/** Patience levels: a cohort that outlasts throttles is watched with STARVING_MS << 1, 2, ... 12. */
const PATIENCE_LEVELS = 13;

/** Reads started in the same millisecond, watched together for starvation. */
class Cohort {
  /** How many of its reads are still pending: it is done at 0. */
  pending = 0;
  /** performance.now() from which a read still pending is starving, if others overtook it. */
  due: number;
  /** Throttles it has outlasted: it is watched with patience STARVING_MS << patience. */
  patience = 0;
  /** True while a throttle waits for its pending reads. */
  owed = false;

  constructor(
    /** performance.now() when its first read started: the cohort's age. */
    readonly started: number,
    /** Reads completed (anywhere) when it was last watched: how many overtook it since. */
    public completed: number,
  ) {
    this.due = started + STARVING_MS;
  }
}

/** Cohorts with pending reads, in the order they are due (one list per patience level). */
class Watchlist {
  /** The cohorts, oldest first; those before #head are done or taken. */
  #cohorts: Cohort[] = [];
  /** Index of the first cohort that may still be pending. */
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
 * Admits or holds back new reads so that no connection starves (see the
 * module documentation). One per selector.
 */
export class Fairness implements ReadGate {
  /** The trace function of the options, if any: throttles are reported through it. */
  readonly #trace: ((event: FairnessEvent) => void) | undefined;
  /** performance.now() of the last select(): the start time of the reads begun since. */
  #now = 0;
  /** performance.now() of the next check: once a millisecond is fine enough, and cheap. */
  #nextCheck = 0;
  /** Reads started and not completed: below STARVING_OVERTAKEN none can starve. */
  #inFlight = 0;
  /** Reads completed so far: how far others overtook a cohort. */
  #completed = 0;
  /** Writes completed so far: with reads, the progress that keeps a throttle going. */
  #writes = 0;
  /** The cohorts of reads being watched, by patience level. */
  #watchlists = Array.from({ length: PATIENCE_LEVELS }, () => new Watchlist());
  /** The cohort that reads started now join. */
  #cohort: Cohort | undefined = undefined;
  // While throttling (#held is set):
  /** Reads held back; those from #heldHead on have not started yet. */
  #held: GatedRead[] | undefined = undefined;
  #heldHead = 0;
  /** Held reads that may start now. */
  #allowance = 0;
  /** The starving cohorts the throttle waits for, and how many of their reads are pending. */
  #owed: Cohort[] = [];
  #owing = 0;
  /** performance.now() at which the throttle ends anyway. */
  #deadline = 0;
  /** Reads and writes completed at the previous timer tick: no progress means a stall. */
  #seen = -1;
  /** The timer that checks a throttle for a stall. */
  #timer: ReturnType<typeof setTimeout> | undefined = undefined;

  /**
   * Creates the plug-in, for `new Selector({ readGate })`.
   *
   * @param options A trace function.
   */
  constructor(options: FairnessOptions = {}) {
    this.#trace = options.trace;
  }

  /**
   * Admits a read about to start, counting it; while throttling, holds it
   * back instead (it starts later in the throttle or after it).
   *
   * @param read The key's read.
   * @returns Whether the read may start now.
   */
  admit(read: GatedRead): boolean {
    if (this.#held) {
      if (this.#allowance === 0) {
        this.#held.push(read);
        return false;
      }
      this.#allowance--;
    }
    // Deno defers reads only when more are ready at once than its budget (128) allows:
    // with fewer in flight none can starve, and watching them would only cost time.
    if (++this.#inFlight > STARVING_OVERTAKEN) {
      let cohort = this.#cohort;
      if (!cohort || this.#now - cohort.started >= 1) {
        this.#cohort = cohort = new Cohort(this.#now, this.#completed);
        this.#watchlists[0].add(cohort);
      }
      cohort.pending++;
      read.gateNote = cohort;
    }
    return true;
  }

  /**
   * Counts a read that completed (or failed).
   *
   * @param read The key's read.
   */
  readDone(read: GatedRead): void {
    this.#inFlight--;
    this.#completed++;
    const cohort = read.gateNote as Cohort | undefined;
    if (!cohort) return;
    read.gateNote = undefined;
    cohort.pending--;
    if (cohort.owed) {
      // All served: end the throttle now, not at the next timer tick (the CPU could idle till then).
      if (--this.#owing === 0) queueMicrotask(this.#endThrottle);
      else if (this.#owing % ADMIT_EVERY === 0) this.#admitOne();
    }
  }

  /** Counts a write that completed: a read may wait for its peer, which waits for that write. */
  writeDone(): void {
    this.#writes++;
  }

  /**
   * After each select(): starts throttling if reads are starving.
   *
   * @param now performance.now() when select() returned.
   */
  selected(now: number): void {
    this.#now = now;
    if (this.#held || now < this.#nextCheck) return;
    this.#nextCheck = now + 1;
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
    this.#held = [];
    this.#heldHead = 0;
    this.#deadline = now + THROTTLE_MAX_MS;
    this.#seen = -1;
    this.#timer = setTimeout(this.#tick, 0);
    this.#trace?.({ step: "throttle", starving: owing });
  }

  /** Ends a throttle at once: the selector is closing (its keys, unregistered, start no reads). */
  close(): void {
    this.#endThrottle();
  }

  /**
   * A timer tick while throttling. Deno runs timers before it delivers the
   * tick's I/O, so a stall (no progress) is judged over a whole timer interval.
   */
  #tick = (): void => {
    const progress = this.#completed + this.#writes;
    if (progress === this.#seen || performance.now() >= this.#deadline) {
      return this.#endThrottle();
    }
    this.#seen = progress;
    this.#timer = setTimeout(this.#tick, 0);
  };

  /** While throttling: lets the next held read start (or the next key that asks). */
  #admitOne(): void {
    const held = this.#held!;
    this.#allowance++;
    while (this.#allowance > 0 && this.#heldHead < held.length) {
      held[this.#heldHead++].startNext();
    }
  }

  /** Ends a throttle: watches the cohorts still owed with more patience, starts the held reads. */
  #endThrottle = (): void => {
    const held = this.#held;
    if (!held) return;
    clearTimeout(this.#timer);
    this.#timer = undefined;
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
    this.#held = undefined;
    this.#allowance = 0;
    this.#trace?.({ step: "unthrottle" });
    for (let i = this.#heldHead; i < held.length; i++) held[i].startNext();
  };
}
