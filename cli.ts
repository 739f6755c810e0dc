/**
 * What the scripts' command lines share: flags (`--name value`, `--name=value`
 * and boolean `--name`) checked against a table with one-line errors, options
 * with defaults, the message for a server that is not running, the signals
 * that stop a server, and the latency figures the client's reports print.
 *
 * @module
 */

/** How one flag is read and checked. */
export interface FlagSpec {
  /** `text`, `integer` (whole number), `number`, or `boolean` (takes no value). */
  type: "text" | "integer" | "number" | "boolean";
  /** The smallest value allowed (numbers). */
  min?: number;
  /** The largest value allowed (numbers). */
  max?: number;
}

/** A table of flags: how each is read, by name without dashes. */
export type FlagSpecs = Record<string, FlagSpec>;

/** The value a flag of this spec gives: text, a number, or true. */
export type FlagValue<S extends FlagSpec> = S["type"] extends "boolean" ? boolean
  : S["type"] extends "text" ? string
  : number;

/** Parsed flags, typed from their table: the values given, by name; those not given are absent. */
export type Flags<Specs extends FlagSpecs = FlagSpecs> = {
  -readonly [Name in keyof Specs]?: FlagValue<Specs[Name]>;
};

/** A mistake on the command line: the message is the one line to show the user. */
export class UsageError extends Error {
  /** The error's name, as Deno's own errors have one. */
  override name = "UsageError";
}

/**
 * Parses command-line arguments against a table of flags; `-h` is `--help`,
 * and an empty value is a mistake.
 *
 * @example Usage
 * ```ts
 * import { parseFlags } from "./cli.ts";
 * import { assertEquals } from "@std/assert";
 *
 * const flags = parseFlags(["--port=80", "--quiet"], {
 *   port: { type: "integer", min: 0, max: 65535 },
 *   quiet: { type: "boolean" },
 * });
 * assertEquals(flags, { port: 80, quiet: true });
 * ```
 *
 * @param args The arguments, e.g. `Deno.args`.
 * @param specs The flags allowed, by name.
 * @returns The flags given; those not given are absent.
 * @throws {UsageError} On an unknown flag, a missing value or a bad value.
 */
export function parseFlags<const Specs extends FlagSpecs>(
  args: string[],
  specs: Specs,
): Flags<Specs> {
  const flags: Record<string, string | number | boolean> = {};
  for (let i = 0; i < args.length; i++) {
    const arg = args[i] === "-h" ? "--help" : args[i];
    const match = /^--([a-z][a-z-]*)(?:=(.*))?$/s.exec(arg);
    if (!match) throw new UsageError(`Unexpected argument "${arg}"`);
    const [, name, inline] = match;
    const spec = Object.hasOwn(specs, name) ? specs[name] : undefined;
    if (!spec) throw new UsageError(`Unknown flag --${name}`);
    if (spec.type === "boolean") {
      if (inline !== undefined) {
        throw new UsageError(`--${name} takes no value`);
      }
      flags[name] = true;
      continue;
    }
    const value = inline ?? args[++i];
    if (value === undefined) {
      throw new UsageError(`--${name} needs a value`);
    }
    if (value.trim() === "") throw new UsageError(`--${name} needs a value, not an empty one`);
    flags[name] = spec.type === "text" ? value : toNumber(name, value, spec);
  }
  return flags as Flags<Specs>; // each value was read as its spec says
}

/** Decimal digits only: `0x22B9`, `1e3` and ` 7` are not whole numbers here. */
const WHOLE_NUMBER = /^\d+$/;
/** A decimal number, perhaps with a fraction or an exponent: `1.5`, `.25`, `2e-3`. */
const DECIMAL_NUMBER = /^(\d+\.?\d*|\.\d+)(e[+-]?\d+)?$/i;

function toNumber(name: string, text: string, spec: FlagSpec): number {
  const { min = -Infinity, max = Infinity } = spec;
  const integer = spec.type === "integer";
  const value = (integer ? WHOLE_NUMBER : DECIMAL_NUMBER).test(text) ? Number(text) : NaN;
  if (Number.isFinite(value) && value >= min && value <= max) return value;
  const kind = integer ? "a whole number" : "a finite number";
  const range = max === Infinity ? `${min} or more` : `from ${min} to ${max}`;
  throw new UsageError(`--${name} must be ${kind} ${range}, got "${text}"`);
}

/**
 * Reads a whole number written in decimal digits, as flags of type `integer` are read.
 *
 * @param text What the user wrote.
 * @returns The number, or NaN if `text` is anything else (`0x10`, `1e3`, `-1`).
 */
export function wholeNumber(text: string): number {
  return WHOLE_NUMBER.test(text) ? Number(text) : NaN;
}

/** What a script says about itself, for {@linkcode parseCommandLine}. */
export interface CommandText {
  /** The script's name, to start error lines with, e.g. `main.ts`. */
  name: string;
  /** The full help, printed for `--help`. */
  help: string;
}

/**
 * A script's command line, start to finish: `--help` prints the help; a mistake
 * prints one line on stderr saying what is wrong and where the flags are listed.
 *
 * @example Usage
 * ```ts
 * import { parseCommandLine } from "./cli.ts";
 * import { assertEquals } from "@std/assert";
 *
 * const text = { name: "x.ts", help: "usage: x.ts [--n N]" };
 * const parsed = parseCommandLine(["--n", "3"], { n: { type: "integer" } }, text, (f) => f.n);
 * assertEquals(parsed, { options: 3 });
 * ```
 *
 * @param args The arguments, e.g. `Deno.args`.
 * @param specs The flags allowed, by name (`--help` is added).
 * @param text The script's name and help.
 * @param toOptions Turns the flags into options; may throw a UsageError.
 * @returns The options, or the exit code to leave with: 0 after the help, 2 after a mistake.
 */
export function parseCommandLine<const Specs extends FlagSpecs, T>(
  args: string[],
  specs: Specs,
  text: CommandText,
  toOptions: (flags: Flags<Specs>) => T,
): { options: T } | { exit: number } {
  try {
    const flags = parseFlags(args, { ...specs, help: { type: "boolean" } });
    if (flags.help) {
      console.log(text.help);
      return { exit: 0 };
    }
    return { options: toOptions(flags as Flags<Specs>) };
  } catch (error) {
    if (!(error instanceof UsageError)) throw error;
    console.error(`${text.name}: ${error.message} (--help lists the flags)`);
    return { exit: 2 };
  }
}

/**
 * Options with defaults: every option absent or `undefined` takes its default.
 *
 * @example Usage
 * ```ts
 * import { withDefaults } from "./cli.ts";
 * import { assertEquals } from "@std/assert";
 *
 * const defaults = { host: "127.0.0.1", port: 8888 };
 * assertEquals(withDefaults({ port: undefined }, defaults), defaults);
 * assertEquals(withDefaults({ port: 0 }, defaults), { host: "127.0.0.1", port: 0 });
 * ```
 *
 * @param options The options given.
 * @param defaults A value for every option.
 * @returns A new object: the defaults, overridden by the options given.
 */
export function withDefaults<T extends object>(options: Partial<T>, defaults: T): T {
  const result = { ...defaults };
  for (const name in options) {
    const value = options[name];
    if (value !== undefined) result[name] = value as T[typeof name];
  }
  return result;
}

/**
 * The flag that grants network access to `host`: an IPv6 address in brackets,
 * as Deno reads it (`--allow-net=::1` is refused).
 *
 * @example Usage
 * ```ts
 * import { allowNetFlag } from "./cli.ts";
 * import { assertEquals } from "@std/assert";
 *
 * assertEquals(allowNetFlag("::1"), "--allow-net=[::1]");
 * assertEquals(allowNetFlag("127.0.0.1"), "--allow-net=127.0.0.1");
 * ```
 *
 * @param host An address or host name.
 * @returns The `--allow-net=` flag.
 */
export function allowNetFlag(host: string): string {
  return `--allow-net=${host.includes(":") ? `[${host}]` : host}`;
}

/**
 * What to tell a user whose connections were refused.
 *
 * @param script The script that connected, to start the line with: `client.ts`.
 * @param hostname The server's address.
 * @param port The server's port.
 * @returns One line: nothing listens there, and how to start the server.
 */
export function refusedMessage(script: string, hostname: string, port: number): string {
  const portFlag = port === 8888 ? "" : ` --port ${port}`; // main.ts's default port
  return `${script}: connection refused by ${hostname}:${port}: is the server running? Start it with: deno task start${portFlag}`;
}

/**
 * A repeat of the same signal within this many milliseconds is the same request,
 * not a second one. Under `deno task`, one Ctrl-C reaches the server twice,
 * about 1 ms apart: the terminal signals the whole process group, and the task
 * forwards the signal to its child as well.
 */
export const SAME_SIGNAL_MS = 200;

/** The signals that stop a server, with the exit status a shell gives a process killed by each. */
const STOP_SIGNALS = [["SIGINT", 130], ["SIGTERM", 143]] as const;

/** What {@linkcode onStopSignals} does with SIGINT and SIGTERM. */
export interface StopSignalHandlers {
  /** The first signal: shut down gracefully. */
  stop(signal: Deno.Signal): void;
  /** A second signal: stop at once, and exit with this status (130 or 143). */
  force(status: number): void;
  /** Whether the server is stopping already, for whatever reason (default: a signal came). */
  stopping?: () => boolean;
  /** A signal left to someone else, and caught so that it does not kill (a worker leaves SIGINT to its parent). */
  ignore?: Deno.Signal;
}

/**
 * Listens for SIGINT and SIGTERM: the first stops the server gracefully, a second
 * forces it, except the same signal again within {@linkcode SAME_SIGNAL_MS}.
 *
 * @param handlers What to do on the first signal and on a second.
 * @returns Removes the listeners.
 */
export function onStopSignals(handlers: StopSignalHandlers): () => void {
  let first: { signal: Deno.Signal; at: number } | undefined;
  const stopping = handlers.stopping ?? (() => first !== undefined);
  const removers = STOP_SIGNALS.map(([signal, status]) => {
    const handler = () => {
      const now = performance.now();
      if (signal === handlers.ignore) return; // listened to, so that it does not kill
      if (!stopping()) {
        first = { signal, at: now };
        handlers.stop(signal);
      } else if (signal !== first?.signal || now - first.at >= SAME_SIGNAL_MS) {
        handlers.force(status);
      }
    };
    Deno.addSignalListener(signal, handler);
    return () => Deno.removeSignalListener(signal, handler);
  });
  return () => removers.forEach((remove) => remove());
}

/** Latency figures in milliseconds, named alike in every report: client.ts's and bench/load.ts's. */
export interface LatencyFigures {
  /** The fastest. */
  min: number;
  /** The median. */
  p50: number;
  /** The 99th percentile. */
  p99: number;
  /** The 99.9th percentile. */
  p999: number;
  /** The slowest. */
  max: number;
}

/**
 * The latency figures of a set of times, each percentile by nearest rank (the
 * smallest time at or above that share of all); NaN for each when there are none.
 *
 * @example Usage
 * ```ts
 * import { latencyFigures } from "./cli.ts";
 * import { assertEquals } from "@std/assert";
 *
 * const times = Array.from({ length: 100 }, (_, i) => i + 1);
 * assertEquals(latencyFigures(times), { min: 1, p50: 50, p99: 99, p999: 100, max: 100 });
 * ```
 *
 * @param times Times in milliseconds, in any order (the array is sorted in place).
 * @returns min, p50, p99, p999 and max.
 */
export function latencyFigures(times: number[]): LatencyFigures {
  times.sort((a, b) => a - b);
  const at = (share: number) => times[Math.max(0, Math.ceil(share * times.length) - 1)] ?? NaN;
  return { min: at(0), p50: at(0.5), p99: at(0.99), p999: at(0.999), max: at(1) };
}
