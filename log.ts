/**
 * Log lines: plain text, or one JSON object per line for log collectors.
 *
 * @module
 */

/** How log lines look: plain text, or one JSON object per line for log collectors. */
export type LogFormat = "text" | "json";

/** Where log lines go: stdout for information, stderr for errors. */
export interface Log {
  /**
   * Logs a line of information.
   *
   * @param message The line.
   * @param fields More to put in a JSON line (a text line leaves them out).
   */
  info(message: string, fields?: Record<string, unknown>): void;
  /**
   * Logs an error.
   *
   * @param message The line.
   * @param fields More to put in a JSON line (a text line leaves them out).
   */
  error(message: string, fields?: Record<string, unknown>): void;
}

/**
 * The version of the JSON log lines' shape, in each line: a collector can tell
 * which fields to expect. Bumped when a field changes its meaning or goes away.
 */
export const LOG_SCHEMA = "echo-log/1";

/**
 * Log lines as plain text, or as one JSON object each, with a timestamp, the
 * schema, and the fields a line carries besides its message (peer, bytes,
 * durationMs, event...).
 *
 * @example Usage
 * ```ts
 * import { logTo } from "./log.ts";
 *
 * logTo("json", { worker: 2 }).info("listening on 127.0.0.1:8888");
 * // {"time":"2026-12-01T17:00:00.000Z","level":"info","message":"listening on 127.0.0.1:8888","schema":"echo-log/1","worker":2}
 * ```
 *
 * @param format `text` or `json`.
 * @param fields What every JSON line carries besides time, level and message.
 * @returns The log.
 */
export function logTo(format: LogFormat, fields: Record<string, unknown> = {}): Log {
  if (format === "text") {
    return { info: (message) => console.log(message), error: (message) => console.error(message) };
  }
  const line = (level: string, message: string, more?: Record<string, unknown>) =>
    JSON.stringify({
      time: new Date().toISOString(),
      level,
      message,
      schema: LOG_SCHEMA,
      ...fields,
      ...more,
    });
  return {
    info: (message, more) => console.log(line("info", message, more)),
    error: (message, more) => console.error(line("error", message, more)),
  };
}

/**
 * A count and its noun, singular or plural: "1 connection", "2 connections".
 *
 * @param n The count.
 * @param noun The noun, singular.
 * @returns Both, for a log line.
 */
export function plural(n: number, noun: string): string {
  return `${n} ${noun}${n === 1 ? "" : "s"}`;
}

/**
 * An error as a short phrase for a log line: its class name, if it has its
 * own, and its message.
 *
 * @param error What was thrown.
 * @returns For example "ConnectionReset: Connection reset by peer (os error 104)".
 */
export function describeError(error: unknown): string {
  if (error instanceof Error) {
    const known = error.name !== "Error" ? `${error.name}: ` : "";
    return `${known}${error.message}`;
  }
  return String(error);
}
