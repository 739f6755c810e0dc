/**
 * The lesson's test client: opens twenty concurrent connections to the echo
 * server; each sends `hello`, reads until the whole echo is back, checks it
 * byte for byte, and closes. Over TCP (the lesson's), a Unix socket, or UDP:
 * twenty senders, each waiting for its datagram to come back, sent again if
 * it does not (UDP may drop).
 *
 * ```sh
 * deno run --allow-net=127.0.0.1 client.ts --port 8888 [--udp | --unix PATH]
 * ```
 *
 * @module
 */

import {
  allowNetFlag,
  type Flags,
  latencyFigures,
  parseCommandLine,
  refusedMessage,
  UsageError,
  withDefaults,
} from "./cli.ts";

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
  /** Connect to this Unix socket instead of hostname and port. */
  unixPath?: string;
  /** Send UDP datagrams instead: each waits timeout / (retries + 1) ms for its reply. @default {false} */
  udp?: boolean;
  /** UDP: how many times a datagram with no reply is sent again. @default {2} */
  retries?: number;
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
  /** True if the failure means no server answers: a refused connection, or no UDP reply at all. */
  refused?: boolean;
  /** True if the failure is the client's own (a missing permission): the same for every connection. */
  setup?: boolean;
}

/** What {@linkcode runClients} does when an option is not given; the flags share them. */
const DEFAULTS: Required<ClientOptions> = {
  hostname: "127.0.0.1",
  port: 8888,
  count: 20,
  message: "hello",
  timeout: 10_000,
  unixPath: "",
  udp: false,
  retries: 2,
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
 * const results = await runClients({ port: (server.addr as Deno.NetAddr).port });
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
  const settings = withDefaults(options, DEFAULTS);
  const { message } = settings;
  const bytes = typeof message === "string" ? new TextEncoder().encode(message) : message;
  const once = settings.udp ? datagramOnce : echoOnce;
  return Promise.all(Array.from({ length: settings.count }, () => once(settings, bytes)));
}

/** One connection: connect, send, read the whole echo, expect EOF after it. */
async function echoOnce(
  { hostname, port, unixPath, timeout }: Required<ClientOptions>,
  message: Uint8Array,
): Promise<ClientResult> {
  const start = performance.now();
  const abort = new AbortController();
  let open: Deno.Conn | undefined; // to close on timeout or when done
  const timer = setTimeout(() => {
    abort.abort();
    open?.close(); // ends a pending read or write
    open = undefined;
  }, timeout);
  let got = 0;
  const result = (error?: string, refused?: boolean, setup?: boolean): ClientResult => ({
    ok: error === undefined,
    bytes: got,
    ms: performance.now() - start,
    ...(error === undefined ? {} : { error }),
    ...(refused ? { refused } : {}),
    ...(setup ? { setup } : {}),
  });
  try {
    const { signal } = abort;
    const conn = open = unixPath
      ? await Deno.connect({ transport: "unix", path: unixPath }) // at once, or refused
      : await Deno.connect({ hostname, port, signal });
    // Deno leaves Nagle on: small writes would wait ~40 ms.
    if ("setNoDelay" in conn) (conn as Deno.TcpConn).setNoDelay(true);
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
      return result(`connection refused by ${unixPath || `${hostname}:${port}`}`, true);
    }
    if (error instanceof Deno.errors.NotFound && unixPath) {
      return result(`no socket at ${unixPath}`, true);
    }
    if (error instanceof Deno.errors.NotCapable) {
      const fix = unixPath
        ? `--allow-read=${unixPath} --allow-write=${unixPath} --allow-net=unix:${unixPath}`
        : allowNetFlag(hostname);
      const where = unixPath || `${hostname}:${port}`;
      return result(`no permission to connect to ${where}: run with ${fix}`, false, true);
    }
    return result(
      error instanceof Error ? `${error.name}: ${error.message}` : String(error),
    );
  } finally {
    clearTimeout(timer);
    open?.close();
  }
}

/**
 * One UDP sender: sends the message from a socket of its own and waits for the
 * same datagram back from the server; sends it again after each wait with no
 * reply, `retries` times.
 */
async function datagramOnce(
  { hostname, port, timeout, retries }: Required<ClientOptions>,
  message: Uint8Array,
): Promise<ClientResult> {
  const start = performance.now();
  const server: Deno.NetAddr = { transport: "udp", hostname, port };
  // Bind where replies from that host can reach: its loopback, or every address.
  const local = hostname.includes(":")
    ? (hostname === "::1" ? "::1" : "::")
    : (hostname.startsWith("127.") ? "127.0.0.1" : "0.0.0.0");
  const socket = Deno.listenDatagram({ transport: "udp", hostname: local, port: 0 });
  const wait = timeout / (retries + 1);
  const buffer = new Uint8Array(65_536); // a smaller one would truncate the datagram
  // One receive at a time, kept across tries: concurrent receives complete in any order.
  let receiving: Promise<[Uint8Array, Deno.Addr]> | undefined;
  /** The next datagram from the server within `ms`, or undefined (others are ignored). */
  const replyWithin = async (ms: number): Promise<Uint8Array | undefined> => {
    let timer: ReturnType<typeof setTimeout> | undefined;
    const late = new Promise<undefined>((resolve) => {
      timer = setTimeout(() => resolve(undefined), ms);
    });
    try {
      for (;;) {
        if (!receiving) {
          receiving = socket.receive(buffer);
          receiving.catch(() => {}); // ends with Interrupted when the socket closes
        }
        const received = await Promise.race([receiving, late]);
        if (!received) return undefined; // the receive stays pending for the next try
        receiving = undefined;
        const [reply, from] = received;
        if ((from as Deno.NetAddr).port === server.port) return reply.slice();
      }
    } finally {
      clearTimeout(timer);
    }
  };
  let lastError = "";
  try {
    for (let attempt = 0; attempt <= retries; attempt++) {
      try {
        await socket.send(message, server);
      } catch (error) {
        lastError = error instanceof Error ? `${error.name}: ${error.message}` : String(error);
        continue;
      }
      const reply = await replyWithin(wait);
      if (!reply) continue; // lost, or no server: send again
      const ms = performance.now() - start;
      if (reply.length !== message.length) {
        return {
          ok: false,
          bytes: reply.length,
          ms,
          error: `got ${reply.length} bytes back, not ${message.length}`,
        };
      }
      const at = reply.findIndex((byte, i) => byte !== message[i]);
      if (at >= 0) {
        return {
          ok: false,
          bytes: reply.length,
          ms,
          error: `byte ${at} differs: sent ${message[at]}, got ${reply[at]}`,
        };
      }
      return { ok: true, bytes: reply.length, ms };
    }
  } finally {
    socket.close();
  }
  const tries = retries + 1;
  const why = lastError ||
    `no reply from ${hostname}:${port} after ${tries} ${tries === 1 ? "try" : "tries"}`;
  return { ok: false, bytes: 0, ms: performance.now() - start, error: why, refused: !lastError };
}

const USAGE =
  `usage: deno run --allow-net=127.0.0.1 client.ts [--host H] [--port N] [--udp [--retries N]] [--unix PATH] [--count N] [--message TEXT] [--timeout MS] [--json]`;

const HELP = `Opens concurrent connections to an echo server; each sends a message and checks
that exactly that message comes back.

${USAGE}

  --host H         server address (default ${DEFAULTS.hostname})
  --port N         server port (default ${DEFAULTS.port})
  --udp            send UDP datagrams instead, each from its own socket (needs --unstable-net)
  --retries N      UDP: send a datagram again this many times if no reply comes (default ${DEFAULTS.retries})
  --unix PATH      connect to a Unix socket instead (needs --allow-read, --allow-write
                   and --allow-net=unix: for PATH)
  --count N        concurrent connections or senders (default ${DEFAULTS.count})
  --message TEXT   what each connection sends (default "${DEFAULTS.message}")
  --timeout MS     milliseconds each connection may take; UDP waits that long over all tries
                   (default ${DEFAULTS.timeout})
  --json           print one JSON document (each connection, and a summary) instead
  --help           show this help

Exit status: 0 if every connection got its exact echo, 1 if not, 2 on bad usage.`;

const FLAGS = {
  host: { type: "text" },
  port: { type: "integer", min: 1, max: 65535 },
  udp: { type: "boolean" },
  retries: { type: "integer", min: 0, max: 100 },
  unix: { type: "text" },
  count: { type: "integer", min: 1, max: 100_000 },
  message: { type: "text" },
  timeout: { type: "integer", min: 1 },
  json: { type: "boolean" },
} as const;

/**
 * Runs the client from the command line.
 *
 * @param args The command-line arguments.
 * @returns The exit code: 0 if every echo was exact, 1 if not, 2 on bad usage.
 */
export async function main(args: string[]): Promise<number> {
  if (args.some((arg) => /^--duration(=|$)/.test(arg))) {
    console.error(
      "client.ts: load for a duration is its own task now: deno task load --duration S (with --help for its flags)",
    );
    return 2;
  }
  const parsed = parseCommandLine(
    args,
    FLAGS,
    { name: "client.ts", help: HELP },
    (flags) => ({ options: optionsFrom(flags), json: flags.json ?? false }),
  );
  if ("exit" in parsed) return parsed.exit;
  const options = withDefaults(parsed.options.options, DEFAULTS);
  if (options.udp && typeof Deno.listenDatagram !== "function") {
    console.error(
      "client.ts: --udp needs Deno's unstable UDP API: add --unstable-net to deno run (the tasks have it, from deno.json)",
    );
    return 2;
  }
  return await printEchoes(options, parsed.options.json);
}

/** Reads the command line into runClients() options, or throws a UsageError. */
function optionsFrom(flags: Flags<typeof FLAGS>): ClientOptions {
  if (flags.unix !== undefined) {
    if (flags.host !== undefined || flags.port !== undefined || flags.udp) {
      throw new UsageError("--unix connects to a socket file: not with --host, --port or --udp");
    }
  }
  if (flags.retries !== undefined && !flags.udp) throw new UsageError("--retries needs --udp");
  return {
    hostname: flags.host,
    port: flags.port,
    udp: flags.udp,
    retries: flags.retries,
    unixPath: flags.unix,
    count: flags.count,
    message: flags.message,
    timeout: flags.timeout,
  };
}

/** The lesson's run: one line per reply, then a summary. */
async function printEchoes(options: Required<ClientOptions>, json: boolean): Promise<number> {
  const start = performance.now();
  const results = await runClients(options);
  const ms = performance.now() - start;
  const passed = results.filter((result) => result.ok).length;
  const failure = results.every((result) => result.refused)
    ? noServerMessage(options)
    : results.every((result) => result.setup)
    ? `client.ts: ${results[0].error}` // the same for all: say it once
    : undefined;
  if (failure) console.error(failure);
  if (json) {
    console.log(JSON.stringify(report(options, results, ms, failure), null, 2));
  } else if (!failure) {
    results.forEach((result, i) => {
      if (result.ok) console.log(`reply from server= ${options.message}`);
      else console.error(`connection ${i + 1}: ${result.error}`);
    });
    console.log(`${passed}/${results.length} echoed in ${Math.round(ms)} ms`);
  }
  return passed === results.length ? 0 : 1;
}

/** The version of `--json`'s shape, in the document: bumped when a field changes or goes away. */
export const CLIENT_REPORT_SCHEMA = "echo-client/1";

/** Everything a run found, for `--json`: each connection, and a summary. */
function report(
  options: Required<ClientOptions>,
  results: ClientResult[],
  ms: number,
  failure: string | undefined,
) {
  const { hostname, port, unixPath, udp } = options;
  const latency = latencyFigures(results.map((result) => result.ms));
  const ok = results.filter((result) => result.ok).length;
  return {
    schema: CLIENT_REPORT_SCHEMA,
    server: unixPath ? { unix: unixPath } : { host: hostname, port, protocol: udp ? "udp" : "tcp" },
    summary: {
      count: results.length,
      ok,
      failed: results.length - ok,
      bytes: results.reduce((sum, result) => sum + result.bytes, 0),
      elapsedMs: round(ms),
      ms: Object.fromEntries(Object.entries(latency).map(([name, value]) => [name, round(value)])),
      ...(failure ? { error: failure } : {}),
    },
    results: results.map((result) => ({ ...result, ms: round(result.ms) })),
  };
}

/** Milliseconds to a hundredth, for reports. */
function round(ms: number): number {
  return Math.round(ms * 100) / 100;
}

/** One line for a user whose server does not answer at all: what to start. */
function noServerMessage({ hostname, port, udp, unixPath }: Required<ClientOptions>): string {
  if (unixPath) {
    return `client.ts: no server listens on ${unixPath}: start one with: deno run --allow-read=${unixPath} --allow-write=${unixPath} --allow-net=unix:${unixPath} main.ts --unix ${unixPath}`;
  }
  if (udp) {
    const portFlag = port === DEFAULTS.port ? "" : ` --port ${port}`;
    return `client.ts: no UDP reply from ${hostname}:${port}: is the server running with --udp? Start it with: deno task start --udp${portFlag}`;
  }
  return refusedMessage("client.ts", hostname, port);
}

if (import.meta.main) Deno.exit(await main(Deno.args));
