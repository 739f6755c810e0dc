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

import { type Flags, parseCommandLine, UsageError } from "./cli.ts";

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
  const {
    hostname = "127.0.0.1",
    port = 8888,
    count = 20,
    message = "hello",
    timeout = 10_000,
  } = options;
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

/** Options for {@linkcode runLoad}. */
export interface LoadOptions {
  /** The server's address. @default {"127.0.0.1"} */
  hostname?: string;
  /** The server's port. @default {8888} */
  port?: number;
  /** Connections, each doing round trips one after another. @default {20} */
  count?: number;
  /** Bytes per message. @default {5} */
  size?: number;
  /** Seconds to run. @default {5} */
  duration?: number;
  /** Milliseconds a round trip may take before it counts as an error. @default {10000} */
  timeout?: number;
}

/** What a load run measured. */
export interface LoadResult {
  /** Round trips completed and verified. */
  roundTrips: number;
  /** Round trips per second. */
  perSecond: number;
  /** Round-trip latency percentiles in milliseconds. */
  p50: number;
  p99: number;
  p999: number;
  /** Jain's fairness index over the connections' round trips: 1 = all served equally. */
  jain: number;
  /** Connections that failed (refused, reset, wrong bytes, timed out), with the first reason. */
  failed: number;
  firstError?: string;
}

/**
 * Closed-loop load: `count` connections each send a message, wait for its whole
 * echo, check every byte, and go again, for `duration` seconds. Each connection
 * sends its own byte stream, so lost, doubled or crossed bytes are caught.
 *
 * @param options Where to connect and how hard.
 * @returns Throughput, latency percentiles and failures.
 */
export async function runLoad(options: LoadOptions = {}): Promise<LoadResult> {
  const {
    hostname = "127.0.0.1",
    port = 8888,
    count = 20,
    size = 5,
    duration = 5,
    timeout = 10_000,
  } = options;
  const latencies: number[] = [];
  const perConnection = new Array<number>(count).fill(0);
  const errors: string[] = [];
  const conns: (Deno.TcpConn | undefined)[] = [];
  const progress: number[] = []; // performance.now() of each connection's last step
  const start = performance.now();
  const end = start + duration * 1000;
  // One watchdog for all connections: a stalled one is closed, which ends its read.
  const watchdog = setInterval(() => {
    const now = performance.now();
    progress.forEach((last, c) => {
      if (now - last > timeout && conns[c]) {
        errors.push(`no echo within ${timeout} ms`);
        conns[c]!.close();
        conns[c] = undefined;
      }
    });
  }, Math.min(timeout, 500));
  await Promise.all(Array.from({ length: count }, async (_, c) => {
    progress[c] = performance.now();
    try {
      const conn = conns[c] = await Deno.connect({ hostname, port });
      conn.setNoDelay(true);
      const sent = new Uint8Array(size);
      const echoed = new Uint8Array(size);
      for (let offset = 0; performance.now() < end; offset += size) {
        for (let i = 0; i < size; i++) sent[i] = streamByte(c, offset + i);
        const begin = progress[c] = performance.now();
        for (let done = 0; done < size;) done += await conn.write(sent.subarray(done));
        for (let got = 0; got < size;) {
          const n = await conn.read(echoed.subarray(got));
          if (n === null) throw new Error(`connection closed at byte ${offset + got}`);
          got += n;
        }
        latencies.push((progress[c] = performance.now()) - begin);
        perConnection[c]++;
        const at = echoed.findIndex((byte, i) => byte !== sent[i]);
        if (at >= 0) throw new Error(`wrong byte at ${offset + at}`);
      }
    } catch (error) {
      if (conns[c]) {
        errors.push(error instanceof Error ? `${error.name}: ${error.message}` : String(error));
      }
    } finally {
      conns[c]?.close();
      conns[c] = undefined;
    }
  }));
  clearInterval(watchdog);
  const seconds = (performance.now() - start) / 1000;
  latencies.sort((a, b) => a - b);
  const at = (q: number) =>
    latencies[Math.min(latencies.length - 1, Math.floor(q * latencies.length))] ?? NaN;
  return {
    roundTrips: latencies.length,
    perSecond: latencies.length / seconds,
    p50: at(0.5),
    p99: at(0.99),
    p999: at(0.999),
    jain: jainIndex(perConnection),
    failed: errors.length,
    ...(errors.length ? { firstError: errors[0] } : {}),
  };
}

/** Jain's fairness index of shares: (Σx)² / (n·Σx²), 1 when all are equal. */
function jainIndex(shares: number[]): number {
  const sum = shares.reduce((a, b) => a + b, 0);
  const squares = shares.reduce((a, b) => a + b * b, 0);
  return squares ? (sum * sum) / (shares.length * squares) : 0;
}

/** Byte `offset` of connection `c`'s stream: varies with both, so a misplaced byte shows. */
function streamByte(c: number, offset: number): number {
  return (offset * 31 + c * 17 + (offset >>> 8)) & 0xff;
}

const USAGE =
  `usage: deno run --allow-net=127.0.0.1 client.ts [--host H] [--port N] [--count N] [--message TEXT] [--timeout MS]`;

const HELP = `Opens concurrent connections to an echo server; each sends a message and checks
that exactly that message comes back.

${USAGE}

  --host H         server address (default 127.0.0.1)
  --port N         server port (default 8888)
  --count N        concurrent connections (default 20)
  --message TEXT   what each connection sends (default "hello")
  --timeout MS     milliseconds each connection may take (default 10000)
  --help           show this help

Load mode, for benchmarks: with --duration, each connection sends --size-byte
messages one after another, checking every echoed byte, and the client prints
round trips per second and latency percentiles.

  --duration S     seconds to run
  --size N         bytes per message, up to 1048576 (default 5)

Exit status: 0 if every connection got its exact echo, 1 if not, 2 on bad usage.`;

const FLAGS = {
  host: { type: "text" },
  port: { type: "integer", min: 1, max: 65535 },
  count: { type: "integer", min: 1, max: 100_000 },
  message: { type: "text" },
  timeout: { type: "integer", min: 1 },
  duration: { type: "number", min: 0.1 },
  size: { type: "integer", min: 1, max: 1 << 20 }, // written whole before reading: within socket buffers
} as const;

/**
 * Runs the client from the command line.
 *
 * @param args The command-line arguments.
 * @returns The exit code: 0 if every echo was exact, 1 if not, 2 on bad usage.
 */
export async function main(args: string[]): Promise<number> {
  const parsed = parseCommandLine(
    args,
    FLAGS,
    { name: "client.ts", usage: USAGE, help: HELP },
    optionsFrom,
  );
  if ("exit" in parsed) return parsed.exit;
  const { options } = parsed;
  return options.duration === undefined ? await printEchoes(options) : await printLoad(options);
}

/** Reads the command line into runClients() or runLoad() options, or throws a UsageError. */
function optionsFrom(flags: Flags): ClientOptions & LoadOptions {
  if (flags.message === "") throw new UsageError("--message must not be empty");
  const load = flags.duration !== undefined;
  if (load && flags.message !== undefined) {
    throw new UsageError("--message and --duration do not go together: load mode uses --size");
  }
  if (!load && flags.size !== undefined) throw new UsageError("--size needs --duration");
  return {
    hostname: flags.host as string | undefined,
    port: flags.port as number | undefined,
    count: flags.count as number | undefined,
    message: flags.message as string | undefined,
    timeout: flags.timeout as number | undefined,
    duration: flags.duration as number | undefined,
    size: flags.size as number | undefined,
  };
}

/** The lesson's run: one line per reply, then a summary. */
async function printEchoes(options: ClientOptions): Promise<number> {
  const start = performance.now();
  const results = await runClients(options);
  const ms = Math.round(performance.now() - start);
  const passed = results.filter((result) => result.ok).length;
  if (results.every((result) => result.refused)) {
    console.error(refusedMessage(options));
    return 1;
  }
  const message = options.message ?? "hello";
  results.forEach((result, i) => {
    if (result.ok) console.log(`reply from server= ${message}`);
    else console.error(`connection ${i + 1}: ${result.error}`);
  });
  console.log(`${passed}/${results.length} echoed in ${ms} ms`);
  return passed === results.length ? 0 : 1;
}

/** Load mode: throughput and latency in two lines. */
async function printLoad(options: LoadOptions): Promise<number> {
  const { count = 20, size = 5, duration = 5 } = options;
  const result = await runLoad(options);
  if (result.failed === count && /ConnectionRefused/.test(result.firstError ?? "")) {
    console.error(refusedMessage(options));
    return 1;
  }
  const ms = (x: number) => x.toFixed(2);
  console.log(
    `${count} connections, ${size}-byte messages, ${duration} s: ${result.roundTrips} round trips verified, ${
      Math.round(result.perSecond)
    }/s`,
  );
  console.log(
    `latency ms: p50 ${ms(result.p50)}, p99 ${ms(result.p99)}, p99.9 ${
      ms(result.p999)
    }; fairness (Jain) ${result.jain.toFixed(3)}`,
  );
  if (result.failed) {
    console.error(`${result.failed} connections failed; first: ${result.firstError}`);
  }
  return result.failed ? 1 : 0;
}

function refusedMessage(options: { hostname?: string; port?: number }): string {
  const { hostname = "127.0.0.1", port = 8888 } = options;
  const portFlag = port === 8888 ? "" : ` --port ${port}`;
  return `client.ts: connection refused by ${hostname}:${port}: is the server running? Start it with: deno task start${portFlag}`;
}

if (import.meta.main) Deno.exit(await main(Deno.args));
