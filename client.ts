/**
 * The lesson's test client: opens twenty concurrent connections to the echo
 * server; each sends `hello`, reads until the whole echo is back, checks it
 * byte for byte, and closes.
 *
 * ```sh
 * deno run --allow-net=127.0.0.1 client.ts --port 8888
 * ```
 *
 * @module
 */

import { type Flags, parseCommandLine, refusedMessage, UsageError, withDefaults } from "./cli.ts";

/** Options for {@linkcode runClients}. */
export interface ClientOptions {
  /** The server's address. @default {"127.0.0.1"} */
  hostname?: string;
  /** The server's port. @default {8888} */
  port?: number;
  /** Concurrent connections. @default {20} */
  count?: number;
  /** What each connection sends. @default {"hello"} */
  message?: string | Uint8Array;
  /** Milliseconds each connection may take, connect to echo. @default {10000} */
  timeout?: number;
}

/** How one connection went. */
export interface ClientResult {
  /** True if the exact message came back, then EOF. */
  ok: boolean;
  /** Bytes of echo received. */
  bytes: number;
  /** Milliseconds from connect to the end of the echo. */
  ms: number;
  /** Why it failed, if it did. */
  error?: string;
  /** True if the failure was a refused connection (no server). */
  refused?: boolean;
}

/** What {@linkcode runClients} does when an option is not given; the flags share them. */
const DEFAULTS: Required<ClientOptions> = {
  hostname: "127.0.0.1",
  port: 8888,
  count: 20,
  message: "hello",
  timeout: 10_000,
};

/**
 * Opens `count` connections at once; each sends the message and checks its echo.
 *
 * @example Usage
 * ```ts
 * import { runClients } from "./client.ts";
 * import { serve } from "./main.ts";
 * import { assert } from "@std/assert";
 *
 * const server = serve({ port: 0, logLevel: "quiet" });
 * const results = await runClients({ port: server.addr.port });
 * assert(results.every((result) => result.ok));
 * await server.close();
 * ```
 *
 * @param options Where to connect and what to send.
 * @returns One result per connection, in order.
 */
export function runClients(
  options: ClientOptions = {},
): Promise<ClientResult[]> {
  const { hostname, port, count, message, timeout } = withDefaults(options, DEFAULTS);
  const bytes = typeof message === "string" ? new TextEncoder().encode(message) : message;
  const runs = [];
  for (let i = 0; i < count; i++) {
    runs.push(echoOnce(hostname, port, bytes, timeout));
  }
  return Promise.all(runs);
}

/** One connection: connect, send, read the whole echo, expect EOF after it. */
async function echoOnce(
  hostname: string,
  port: number,
  message: Uint8Array,
  timeout: number,
): Promise<ClientResult> {
  const start = performance.now();
  const abort = new AbortController();
  let open: Deno.TcpConn | undefined; // to close on timeout or when done
  const timer = setTimeout(() => {
    abort.abort();
    open?.close(); // ends a pending read or write
    open = undefined;
  }, timeout);
  let got = 0;
  const result = (error?: string, refused?: boolean): ClientResult => ({
    ok: error === undefined,
    bytes: got,
    ms: performance.now() - start,
    ...(error === undefined ? {} : { error }),
    ...(refused ? { refused } : {}),
  });
  try {
    const conn = open = await Deno.connect({
      hostname,
      port,
      signal: abort.signal,
    });
    conn.setNoDelay(true); // Deno leaves Nagle on: small writes would wait ~40 ms
    for (let sent = 0; sent < message.length;) {
      sent += await conn.write(message.subarray(sent));
    }
    const reply = new Uint8Array(message.length);
    while (got < reply.length) {
      const n = await conn.read(reply.subarray(got)); // TCP may split the echo
      if (n === null) {
        return result(
          `connection closed after ${got} of ${reply.length} bytes`,
        );
      }
      got += n;
    }
    const at = reply.findIndex((byte, i) => byte !== message[i]);
    if (at >= 0) {
      return result(
        `byte ${at} differs: sent ${message[at]}, got ${reply[at]}`,
      );
    }
    await conn.closeWrite(); // the echo must end here: expect EOF, not more bytes
    if (await conn.read(new Uint8Array(1)) !== null) {
      return result("the server sent more bytes than were sent to it");
    }
    return result();
  } catch (error) {
    if (abort.signal.aborted) {
      return result(
        `no complete echo within ${timeout} ms (${got} of ${message.length} bytes)`,
      );
    }
    if (error instanceof Deno.errors.ConnectionRefused) {
      return result(`connection refused by ${hostname}:${port}`, true);
    }
    return result(
      error instanceof Error ? `${error.name}: ${error.message}` : String(error),
    );
  } finally {
    clearTimeout(timer);
    open?.close();
  }
}

const USAGE =
  `usage: deno run --allow-net=127.0.0.1 client.ts [--host H] [--port N] [--count N] [--message TEXT] [--timeout MS]`;

const HELP = `Opens concurrent connections to an echo server; each sends a message and checks
that exactly that message comes back.

${USAGE}

  --host H         server address (default ${DEFAULTS.hostname})
  --port N         server port (default ${DEFAULTS.port})
  --count N        concurrent connections (default ${DEFAULTS.count})
  --message TEXT   what each connection sends (default "${DEFAULTS.message}")
  --timeout MS     milliseconds each connection may take (default ${DEFAULTS.timeout})
  --duration S     load mode instead, for benchmarks: see --duration 1 --help
  --help           show this help

Exit status: 0 if every connection got its exact echo, 1 if not, 2 on bad usage.`;

const FLAGS = {
  host: { type: "text" },
  port: { type: "integer", min: 1, max: 65535 },
  count: { type: "integer", min: 1, max: 100_000 },
  message: { type: "text" },
  timeout: { type: "integer", min: 1 },
} as const;

/**
 * Runs the client from the command line. With `--duration` it is the load
 * generator of bench/load.ts instead.
 *
 * @param args The command-line arguments.
 * @returns The exit code: 0 if every echo was exact, 1 if not, 2 on bad usage.
 */
export async function main(args: string[]): Promise<number> {
  if (args.some((arg) => /^--duration(=|$)/.test(arg))) {
    const load = await import("./bench/load.ts");
    return await load.main(args);
  }
  const parsed = parseCommandLine(
    args,
    FLAGS,
    { name: "client.ts", usage: USAGE, help: HELP },
    optionsFrom,
  );
  if ("exit" in parsed) return parsed.exit;
  return await printEchoes(withDefaults(parsed.options, DEFAULTS));
}

/** Reads the command line into runClients() options, or throws a UsageError. */
function optionsFrom(flags: Flags<typeof FLAGS>): ClientOptions {
  if (flags.message === "") throw new UsageError("--message must not be empty");
  return {
    hostname: flags.host,
    port: flags.port,
    count: flags.count,
    message: flags.message,
    timeout: flags.timeout,
  };
}

/** The lesson's run: one line per reply, then a summary. */
async function printEchoes(options: Required<ClientOptions>): Promise<number> {
  const start = performance.now();
  const results = await runClients(options);
  const ms = Math.round(performance.now() - start);
  const passed = results.filter((result) => result.ok).length;
  if (results.every((result) => result.refused)) {
    console.error(refusedMessage(options.hostname, options.port));
    return 1;
  }
  results.forEach((result, i) => {
    if (result.ok) console.log(`reply from server= ${options.message}`);
    else console.error(`connection ${i + 1}: ${result.error}`);
  });
  console.log(`${passed}/${results.length} echoed in ${ms} ms`);
  return passed === results.length ? 0 : 1;
}

if (import.meta.main) Deno.exit(await main(Deno.args));
