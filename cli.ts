/**
 * Command-line flags for main.ts and client.ts: `--name value`, `--name=value`
 * and boolean `--name`, checked against a table, with one-line errors.
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

/** Parsed flags: the values given, by flag name without dashes. */
export type Flags = Record<string, string | number | boolean | undefined>;

/** A mistake on the command line: the message is the one line to show the user. */
export class UsageError extends Error {
  override name = "UsageError";
}

/**
 * Parses command-line arguments against a table of flags.
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
export function parseFlags(
  args: string[],
  specs: Record<string, FlagSpec>,
): Flags {
  const flags: Flags = {};
  for (let i = 0; i < args.length; i++) {
    const arg = args[i];
    const match = /^--([a-z][a-z-]*)(?:=(.*))?$/s.exec(arg);
    if (!match) {
      throw new UsageError(
        arg === "-h" ? "Use --help" : `Unexpected argument "${arg}"`,
      );
    }
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
    flags[name] = spec.type === "text" ? value : toNumber(name, value, spec);
  }
  return flags;
}

function toNumber(name: string, text: string, spec: FlagSpec): number {
  const { min = -Infinity, max = Infinity } = spec;
  const value = text.trim() === "" ? NaN : Number(text);
  const integer = spec.type === "integer";
  if (
    (integer ? Number.isInteger(value) : Number.isFinite(value)) &&
    value >= min && value <= max
  ) {
    return value;
  }
  const kind = integer ? "a whole number" : "a number";
  const range = max === Infinity ? `${min} or more` : `from ${min} to ${max}`;
  throw new UsageError(`--${name} must be ${kind} ${range}, got "${text}"`);
}

/** What a script says about itself, for {@linkcode parseCommandLine}. */
export interface CommandText {
  /** The script's name, to start error lines with, e.g. `main.ts`. */
  name: string;
  /** The one-line usage, printed after an error. */
  usage: string;
  /** The full help, printed for `--help`. */
  help: string;
}

/**
 * A script's command line, start to finish: `--help` prints the help; a mistake
 * prints one line saying what is wrong, then the usage, on stderr.
 *
 * @example Usage
 * ```ts
 * import { parseCommandLine } from "./cli.ts";
 * import { assertEquals } from "@std/assert";
 *
 * const text = { name: "x.ts", usage: "usage: x.ts [--n N]", help: "..." };
 * const parsed = parseCommandLine(["--n", "3"], { n: { type: "integer" } }, text, (f) => f.n);
 * assertEquals(parsed, { options: 3 });
 * ```
 *
 * @param args The arguments, e.g. `Deno.args`.
 * @param specs The flags allowed, by name (`--help` is added).
 * @param text The script's name, usage line and help.
 * @param toOptions Turns the flags into options; may throw a UsageError.
 * @returns The options, or the exit code to leave with: 0 after the help, 2 after a mistake.
 */
export function parseCommandLine<T>(
  args: string[],
  specs: Record<string, FlagSpec>,
  text: CommandText,
  toOptions: (flags: Flags) => T,
): { options: T } | { exit: number } {
  try {
    const flags = parseFlags(args, { ...specs, help: { type: "boolean" } });
    if (flags.help) {
      console.log(text.help);
      return { exit: 0 };
    }
    return { options: toOptions(flags) };
  } catch (error) {
    if (!(error instanceof UsageError)) throw error;
    console.error(`${text.name}: ${error.message}\n${text.usage}`);
    return { exit: 2 };
  }
}
