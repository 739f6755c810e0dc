/**
 * Watch the loop work: turns loop.ts's trace events into lines a learner can
 * follow, turn by turn, for `main.ts --trace`. Bounded: past `maxPerSecond`
 * lines in a second, further lines are counted, and one line says how many.
 *
 * ```text
 * select() → 1 ready: listener 127.0.0.1:8888 READ
 *   accept(listener 127.0.0.1:8888, READ)
 * select() → 1 ready: conn 127.0.0.1:50412 READ
 *   read(conn 127.0.0.1:50412, READ)
 * ```
 *
 * @module
 */

import { READ, type SelectorKey, type TraceEvent, WRITE } from "./loop.ts";
import type { WakeEvent } from "./async_loop.ts";
import type { FairnessEvent } from "./fairness.ts";

/** Everything there is to trace: the loop's steps, coroutines' wake-ups, fairness throttles. */
export type AnyTraceEvent = TraceEvent | WakeEvent | FairnessEvent;

/** Options for {@linkcode createTracer}. */
export interface TracerOptions {
  /** Lines printed in any one second at most; the rest are counted. @default {200} */
  maxPerSecond?: number;
  /** Where lines go. @default {console.log} */
  write?: (line: string) => void;
}

/**
 * A trace function that prints one line per step: give it to the selector,
 * the coroutine loop and the fairness plug-in alike (their `trace` options).
 *
 * @example Usage
 * ```ts
 * import { Selector } from "./loop.ts";
 * import { createTracer } from "./trace.ts";
 * import { assertEquals } from "@std/assert";
 *
 * const lines: string[] = [];
 * const selector = new Selector({ trace: createTracer({ write: (line) => lines.push(line) }) });
 * await selector.select(0);
 * assertEquals(lines, ["select() → nothing ready"]);
 * ```
 *
 * @param options The bound, and where lines go.
 * @returns The trace function.
 */
export function createTracer(options: TracerOptions = {}): (event: AnyTraceEvent) => void {
  const { maxPerSecond = 200, write = console.log } = options;
  let second = -Infinity; // performance.now() when the current second began
  let printed = 0;
  let skipped = 0;
  return (event) => {
    const now = performance.now();
    if (now - second >= 1000) {
      if (skipped) write(`… ${skipped} more trace lines in that second`);
      second = now;
      printed = 0;
      skipped = 0;
    }
    if (printed === maxPerSecond) {
      skipped++;
      return;
    }
    printed++;
    write(formatTrace(event));
  };
}

/**
 * One trace event as a line: select() results flush left, what runs for each
 * key indented under them.
 *
 * @param event The event.
 * @returns The line.
 */
export function formatTrace(event: AnyTraceEvent): string {
  switch (event.step) {
    case "select": {
      const { ready } = event;
      if (ready.length === 0) return "select() → nothing ready";
      const shown = ready.length > 4 ? ready.slice(0, 3) : ready; // one line stays readable
      const keys = shown.map(([key, mask]) => `${describeKey(key)} ${maskName(mask)}`);
      if (shown.length < ready.length) keys.push(`… ${ready.length - shown.length} more`);
      return `select() → ${ready.length} ready: ${keys.join(", ")}`;
    }
    case "callback":
      return `  ${event.key.callback.name || "callback"}(${describeKey(event.key)}, ${
        maskName(event.mask)
      })`;
    case "wake":
      return `    → ${event.call}() on ${describeKey(event.key)} resumes: ${
        describeResult(event.result)
      }`;
    case "pause":
      return `  ${describeKey(event.key)}: ${event.key.queued} bytes queued, reading paused`;
    case "resume":
      return `  ${describeKey(event.key)}: ${event.key.queued} bytes queued, reading again`;
    case "throttle":
      return `fairness: new reads throttled until ${event.starving} starving reads are served`;
    case "unthrottle":
      return "fairness: throttle over";
  }
}

/**
 * A key as its resource: `listener 127.0.0.1:8888`, `conn 127.0.0.1:50412`
 * (the peer), or `udp 127.0.0.1:8888`.
 */
function describeKey(key: SelectorKey): string {
  const { resource } = key;
  if ("remoteAddr" in resource) return `conn ${formatAddr(resource.remoteAddr)}`;
  return `${resource.addr.transport === "udp" ? "udp" : "listener"} ${formatAddr(resource.addr)}`;
}

/** What a coroutine resumes with: `5 bytes`, `EOF`, an error, a connection, a datagram. */
function describeResult(result: WakeEvent["result"]): string {
  if (result === null) return "EOF";
  if (typeof result === "string") return result;
  if (result instanceof Uint8Array) return `${result.length} bytes`;
  if (result instanceof Error) return `${result.name}: ${result.message}`;
  if (Array.isArray(result)) return `${result[0].length} bytes from ${formatAddr(result[1])}`;
  return describeKey(result);
}

/**
 * An address as people write it: `host:port`, with brackets for IPv6; a Unix socket's path.
 *
 * @param addr The address.
 * @returns The text.
 */
export function formatAddr(addr: Deno.Addr): string {
  if (addr.transport === "tcp" || addr.transport === "udp") {
    const host = addr.hostname.includes(":") ? `[${addr.hostname}]` : addr.hostname;
    return `${host}:${addr.port}`;
  }
  return "path" in addr && addr.path ? addr.path : addr.transport;
}

function maskName(mask: number): string {
  return [mask & READ && "READ", mask & WRITE && "WRITE"].filter(Boolean).join("|") || "0";
}
