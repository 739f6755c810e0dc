/**
 * A TCP echo server on the readiness loop of loop.ts: an accept callback
 * registers each connection with a read callback, and the read callback
 * sends back whatever arrives.
 *
 * ```sh
 * deno run --allow-net=127.0.0.1 main.ts --port 8888
 * ```
 *
 * @module
 */

import { READ, Selector, type SelectorKey, WRITE } from "./loop.ts";
import { type Flags, parseCommandLine, UsageError, withDefaults } from "./cli.ts";
import { formatAddr } from "./trace.ts";

/** How much the server prints. */
export type LogLevel = "quiet" | "info" | "verbose";

/** Options for {@linkcode serve}. */
export interface ServeOptions {
  /** The address to listen on. @default {"127.0.0.1"} */
  hostname?: string;
  /** The port; 0 picks a free one. @default {8888} */
  port?: number;
  /** Connections served at once; more wait in the kernel's backlog. @default {10000} */
  maxConns?: number;
  /** Close connections idle for this many milliseconds; 0 never does. @default {0} */
  idleTimeout?: number;
  /** On close(), how long connections may take to finish before they are cut. @default {5000} */
  gracePeriod?: number;
  /** `quiet`: errors only; `info`: a line per connection; `verbose`: and per echo. @default {"info"} */
  logLevel?: LogLevel;
}

/** Counters of a running server. */
export interface ServerStats {
  /** Connections open now. */
  readonly open: number;
  /** Connections accepted since the start. */
  accepted: number;
  /** Bytes received from all connections, each queued to be echoed. */
  bytes: number;
  /** Bytes received and not yet written back, over all connections. */
  readonly queued: number;
}

/** A running echo server. */
export interface Server {
  /** The address it listens on, with the real port. */
  readonly addr: Deno.NetAddr;
  /** Live counters. */
  readonly stats: Readonly<ServerStats>;
  /**
   * Shuts down gracefully: stops accepting, writes back every byte already
   * read, closes every connection (cutting those still open after the grace
   * period).
   *
   * @returns The same promise as {@linkcode Server.finished}.
   */
  close(): Promise<void>;
  /** Settles when the server has shut down. */
  readonly finished: Promise<void>;
}

/** What the server keeps for each connection (little: idle connections add up). */
interface Connection {
  /** Bytes received, each echoed (or queued to be). */
  bytes: number;
  /** performance.now() of the last read, for the idle timeout. */
  lastRead: number;
}

/** A connection's key in the selector, with the server's data attached. */
type ClientKey = SelectorKey<Connection>;

/** The peer's address of a connection's key, for log lines. */
function peerOf(key: ClientKey): string {
  return formatAddr((key.resource as Deno.Conn).remoteAddr);
}

/** An error as a short phrase: its Deno class name, or its message. */
function describe(error: unknown): string {
  if (error instanceof Error) {
    const known = error.name !== "Error" ? `${error.name}: ` : "";
    return `${known}${error.message}`;
  }
  return String(error);
}

/** What {@linkcode serve} does when an option is not given; main.ts's flags share them. */
const DEFAULTS: Required<ServeOptions> = {
  hostname: "127.0.0.1",
  port: 8888,
  maxConns: 10_000,
  idleTimeout: 0,
  gracePeriod: 5000,
  logLevel: "info",
};

/**
 * Starts an echo server.
 *
 * @example Usage
 * ```ts
 * import { serve } from "./main.ts";
 * import { assertEquals } from "@std/assert";
 *
 * const server = serve({ port: 0, logLevel: "quiet" });
 * const conn = await Deno.connect({ port: server.addr.port });
 * await conn.write(new TextEncoder().encode("hello"));
 * const reply = new Uint8Array(5);
 * assertEquals(await conn.read(reply), 5);
 * conn.close();
 * await server.close();
 * ```
 *
 * @param options Where to listen, limits and logging.
 * @returns The running server.
 * @throws What `Deno.listen` throws: `Deno.errors.AddrInUse`, `NotCapable`...
 */
export function serve(options: ServeOptions = {}): Server {
  const { hostname, port, maxConns, idleTimeout, gracePeriod, logLevel } = withDefaults(
    options,
    DEFAULTS,
  );
  const logs = logLevel !== "quiet";
  const verbose = logLevel === "verbose";

  const listener = Deno.listen({ hostname, port });
  const selector = new Selector();
  const connections = new Set<ClientKey>();
  const stats: ServerStats = {
    get open() {
      return connections.size;
    },
    accepted: 0,
    bytes: 0,
    get queued() {
      let queued = 0;
      for (const key of connections) queued += key.queued;
      return queued;
    },
  };
  const stopped = Promise.withResolvers<void>(); // settles when run() ends
  let idleTimer: ReturnType<typeof setInterval> | undefined = undefined;
  let outOfDescriptors = false;
  let shuttingDown = false;

  // The listener's callback: the lesson's accept().
  function accept(key: SelectorKey, _mask: number): void {
    let conn: Deno.Conn;
    try {
      conn = key.accept(); // should be ready
    } catch (error) {
      return acceptFailed(error);
    }
    if (outOfDescriptors) {
      outOfDescriptors = false;
      console.error("accepting again");
    }
    (conn as Deno.TcpConn).setNoDelay(true); // Deno leaves Nagle on: small echoes would wait ~40 ms
    if (logs) console.log(`${formatAddr(conn.remoteAddr)} connected`);
    const data = { bytes: 0, lastRead: idleTimeout && performance.now() };
    connections.add(selector.register(conn, READ, read, data));
    stats.accepted++;
    if (stats.open >= maxConns) {
      selector.modify(listener, 0); // the kernel's backlog holds newcomers
      if (logs) console.log(`${maxConns} connections open: new ones wait until one closes`);
    }
  }

  function acceptFailed(error: unknown): void {
    if (/too many open files/i.test(String(error))) {
      if (!outOfDescriptors) {
        outOfDescriptors = true;
        console.error(
          "out of file descriptors: pausing accepts until connections close (raise `ulimit -n` or lower --max-conns)",
        );
      }
      return; // loop.ts backs off before the next accept
    }
    console.error(`accept failed: ${describe(error)}`);
  }

  // A connection's life, and the callback that runs in each state:
  //
  //   state        interest  callback      what it does
  //   reading      READ      read()        echoes what arrives; at EOF → finishing
  //   finishing    WRITE     flushed()     the echo is all written: close → closed
  //   draining     WRITE     drained()     (shutdown) the echo is all written:
  //                                        half-close → half-closed
  //   half-closed  READ      halfClosed()  (shutdown) drops input until the peer's
  //                                        EOF → closed
  //   closed       none      close()       unregistered and closed; also on any error
  //
  // At shutdown every reading or finishing connection becomes draining.

  // Reading: the lesson's read().
  function read(key: ClientKey, _mask: number): void {
    let data: Uint8Array | null;
    try {
      data = key.recv(); // should be ready
    } catch (error) {
      return close(key, error); // a reset or the like: this connection only
    }
    if (data) {
      if (verbose) console.log(`${peerOf(key)} echoing ${data.length} bytes`);
      key.data.bytes += data.length;
      stats.bytes += data.length;
      if (idleTimeout) key.data.lastRead = performance.now();
      key.send(data); // queued: the loop writes every byte
    } else {
      // EOF: the peer is done sending. Write back what is queued, then close.
      selector.modify(key.resource, WRITE, flushed);
    }
  }

  function flushed(key: ClientKey, _mask: number): void {
    close(key, key.error);
  }

  // Draining and half-closed: graceful shutdown writes back what was read, then
  // half-closes and waits for the peer's EOF (closing with unread input would
  // send a reset, which can destroy echoed bytes still in flight); input that
  // arrives now is dropped.
  function drained(key: ClientKey, _mask: number): void {
    if (key.error) return close(key, key.error);
    (key.resource as Deno.Conn).closeWrite().catch((error) => {
      if (connections.has(key)) close(key, error); // e.g. the peer reset meanwhile
    });
    selector.modify(key.resource, READ, halfClosed);
  }

  function halfClosed(key: ClientKey, _mask: number): void {
    let data: Uint8Array | null;
    try {
      data = key.recv();
    } catch (error) {
      return close(key, error);
    }
    if (data === null) close(key);
  }

  function close(key: ClientKey, error?: unknown): void {
    selector.unregister(key.resource);
    key.resource.close();
    connections.delete(key);
    if (logs) {
      const { bytes } = key.data;
      console.log(
        error
          ? `${peerOf(key)} closed after ${bytes} bytes: ${describe(error)}`
          : `${peerOf(key)} closed, ${bytes} bytes echoed`,
      );
    }
    if (shuttingDown) {
      if (stats.open === 0) selector.close();
    } else if (stats.open === maxConns - 1) {
      selector.modify(listener, READ);
    }
  }

  function closeIdle(): void {
    const now = performance.now();
    for (const key of connections) {
      if (now - key.data.lastRead > idleTimeout) {
        close(key, new Error(`idle for over ${idleTimeout / 1000} s`));
      }
    }
  }

  function shutdown(): Promise<void> {
    if (shuttingDown) return stopped.promise;
    shuttingDown = true;
    clearInterval(idleTimer);
    selector.unregister(listener);
    listener.close();
    if (connections.size === 0) selector.close();
    for (const key of connections) {
      selector.modify(key.resource, WRITE, drained);
    }
    const graceTimer = setTimeout(() => {
      for (const key of connections) close(key, new Error("grace period over"));
    }, gracePeriod);
    const stopTimer = () => clearTimeout(graceTimer);
    stopped.promise.then(stopTimer, stopTimer);
    return stopped.promise;
  }

  // Start: watch the listener, then run the loop until shutdown.
  selector.register(listener, READ, accept);
  if (idleTimeout > 0) idleTimer = setInterval(closeIdle, Math.min(1000, idleTimeout / 2));
  selector.run().finally(() => {
    clearInterval(idleTimer);
    if (!shuttingDown) listener.close();
  }).then(stopped.resolve, stopped.reject);
  return {
    addr: listener.addr,
    stats,
    close: shutdown,
    finished: stopped.promise,
  };
}

const USAGE =
  `usage: deno run --allow-net=127.0.0.1 main.ts [--host H] [--port N] [--max-conns N] [--idle-timeout S] [--verbose | --quiet]`;

const HELP = `A TCP echo server: sends back every byte it receives.

${USAGE}

  --host H           address to listen on (default ${DEFAULTS.hostname}; 0.0.0.0 exposes it to the network)
  --port N           port, 0 picks a free one (default ${DEFAULTS.port})
  --max-conns N      connections served at once; more wait in the kernel's backlog (default ${DEFAULTS.maxConns})
  --idle-timeout S   close connections idle for S seconds (default ${DEFAULTS.idleTimeout}: never)
  --verbose          also log every echo
  --quiet            log errors only
  --help             show this help

SIGINT or SIGTERM shuts down gracefully: a second one exits at once.`;

const FLAGS = {
  host: { type: "text" },
  port: { type: "integer", min: 0, max: 65535 },
  "max-conns": { type: "integer", min: 1 },
  "idle-timeout": { type: "number", min: 0 },
  verbose: { type: "boolean" },
  quiet: { type: "boolean" },
} as const;

/** Reads the command line into serve() options, or throws a UsageError. */
function optionsFrom(flags: Flags<typeof FLAGS>): ServeOptions {
  if (flags.verbose && flags.quiet) {
    throw new UsageError("--verbose and --quiet do not go together");
  }
  const idleSeconds = flags["idle-timeout"];
  return {
    hostname: flags.host,
    port: flags.port,
    maxConns: flags["max-conns"],
    idleTimeout: idleSeconds === undefined ? undefined : idleSeconds * 1000,
    logLevel: flags.quiet ? "quiet" : flags.verbose ? "verbose" : undefined,
  };
}

/** Why listening failed, in one line with what to do about it. */
function listenError(error: unknown, host: string, port: number): string {
  const where = `${host}:${port}`;
  if (error instanceof Deno.errors.AddrInUse) {
    return `port ${port} on ${host} is already in use: stop the other server or choose another port with --port`;
  }
  if (error instanceof Deno.errors.NotCapable) {
    const task = host === "127.0.0.1" ? " (deno task start does)" : "";
    return `no permission to listen on ${where}: run with --allow-net=${host}${task}`;
  }
  if (error instanceof Deno.errors.AddrNotAvailable) {
    return `cannot listen on ${host}: it is not an address of this machine (check --host)`;
  }
  if (error instanceof Deno.errors.PermissionDenied) {
    return `not allowed to listen on ${where}: ports below 1024 need privileges; choose another with --port`;
  }
  if (/failed to lookup address/i.test(String(error))) {
    return `cannot resolve host "${host}": check --host`;
  }
  return `cannot listen on ${where}: ${describe(error)}`;
}

function isLoopback(host: string): boolean {
  return host.startsWith("127.") || host === "::1" ||
    host === "::ffff:127.0.0.1";
}

/**
 * Runs the server from the command line until SIGINT or SIGTERM.
 *
 * @param args The command-line arguments.
 * @returns The exit code: 0 after a clean shutdown, 1 if it could not start, 2 on bad usage.
 */
export async function main(args: string[]): Promise<number> {
  const parsed = parseCommandLine(
    args,
    FLAGS,
    { name: "main.ts", usage: USAGE, help: HELP },
    optionsFrom,
  );
  if ("exit" in parsed) return parsed.exit;
  const options = withDefaults(parsed.options, DEFAULTS);
  const { hostname, port } = options;
  let server: Server;
  try {
    server = serve(options);
  } catch (error) {
    console.error(`main.ts: ${listenError(error, hostname, port)}`);
    return 1;
  }
  // The first SIGINT or SIGTERM shuts down gracefully; a second one exits at once,
  // with the status a shell gives a process killed by that signal.
  let stopping = false;
  const signals = [["SIGINT", 130], ["SIGTERM", 143]] as const;
  const handlers = signals.map(([signal, status]) => {
    const handler = () => {
      if (stopping) Deno.exit(status);
      stopping = true;
      if (options.logLevel !== "quiet") {
        console.log(
          `shutting down: ${server.stats.open} connections to finish (${signal} again to force)`,
        );
      }
      server.close();
    };
    Deno.addSignalListener(signal, handler);
    return () => Deno.removeSignalListener(signal, handler);
  });
  // Announce only now: whoever waits for this line may signal at once.
  const { addr } = server;
  if (options.logLevel !== "quiet") {
    const exposed = isLoopback(addr.hostname) ? "" : " (reachable from the network)";
    console.log(`listening on ${formatAddr(addr)}${exposed}`);
  }
  await server.finished;
  for (const remove of handlers) remove();
  return 0;
}

if (import.meta.main) Deno.exit(await main(Deno.args));
