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
