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

/** Options for {@linkcode createTracer}. */
export interface TracerOptions {
  /** Lines printed in any one second at most; the rest are counted. @default {200} */
  maxPerSecond?: number;
  /** Where lines go. @default {console.log} */
  write?: (line: string) => void;
}

/**
 * A trace function for {@linkcode SelectorOptions.trace} that prints one line per step.
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
export function createTracer(options: TracerOptions = {}): (event: TraceEvent) => void {
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
export function formatTrace(event: TraceEvent): string {
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
    case "wake": {
      const { result } = event;
      const got = typeof result === "string" ? result : describeKey(result);
      return `    → ${event.call}() on ${describeKey(event.key)} resumes: ${got}`;
    }
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

/** A key as its resource: `listener 127.0.0.1:8888` or `conn 127.0.0.1:50412` (the peer). */
function describeKey(key: SelectorKey): string {
  const { resource } = key;
  return "remoteAddr" in resource
    ? `conn ${formatAddr(resource.remoteAddr)}`
    : `listener ${formatAddr(resource.addr)}`;
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
