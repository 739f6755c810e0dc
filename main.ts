/**
 * A TCP echo server on the readiness loop of loop.ts, in either of the
 * lesson's two styles:
 *
 * - callbacks (the default): an accept callback registers each connection
 *   with a read callback, and the read callback sends back whatever arrives;
 * - async: the same loop driven by coroutines (async_loop.ts), an accept loop
 *   and one `while ((data = await recv()) !== null) await send(data)` per
 *   connection.
 *
 * Both share everything else: limits, logs, idle timeout and shutdown.
 *
 * ```sh
 * deno run --allow-net=127.0.0.1 main.ts --port 8888 [--style async] [--trace]
 * ```
 *
 * @module
 */

import { READ, type Resource, Selector, type SelectorKey, type TraceEvent, WRITE } from "./loop.ts";
import { AsyncLoop, type Connection } from "./async_loop.ts";
import { type Flags, parseCommandLine, UsageError, withDefaults } from "./cli.ts";
import { createTracer, formatAddr } from "./trace.ts";

/** How much the server prints. */
export type LogLevel = "quiet" | "info" | "verbose";

/** How the server is written: the lesson's callbacks, or coroutines on the same loop. */
export type Style = "callbacks" | "async";

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
  /** Callbacks or coroutines. @default {"callbacks"} */
  style?: Style;
  /** Called at each step of the loop, to watch it work (see trace.ts). */
  trace?: (event: TraceEvent) => void;
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
interface Peer {
  /** Bytes received, each echoed (or queued to be). */
  bytes: number;
  /** performance.now() of the last read, for the idle timeout. */
  lastRead: number;
}

/** A connection in either style: its selector key, or its coroutines' Connection. */
interface Client {
  readonly resource: Resource;
  readonly queued: number;
  data: Peer;
}

/** A connection's key in the selector (callbacks), with the server's record attached. */
type ClientKey = SelectorKey<Peer>;

/** What differs between the two styles; serve() does the rest. */
interface Engine {
  /** Serves until stop(). */
  run(): Promise<void>;
  /** Stops accepting (at the connection cap: newcomers wait in the backlog), or accepts again. */
  accepting(on: boolean): void;
  /** Closes the listener: the server is shutting down. */
  closeListener(): void;
  /** Closes a connection now. */
  release(client: Client): void;
  /** At shutdown: write back what is queued, half-close, wait for the peer's EOF, close. */
  drain(client: Client): void;
  /** Ends run(): the last connection is closed. */
  stop(): void;
}

/** The peer's address of a connection, for log lines. */
function peerOf(client: Client): string {
  return formatAddr((client.resource as Deno.Conn).remoteAddr);
}

/** An error as a short phrase: its Deno class name, or its message. */
function describe(error: unknown): string {
  if (error instanceof Error) {
    const known = error.name !== "Error" ? `${error.name}: ` : "";
    return `${known}${error.message}`;
  }
  return String(error);
}

/** What {@linkcode serve} does when an option is not given (no trace); main.ts's flags share them. */
const DEFAULTS: Required<Omit<ServeOptions, "trace">> = {
  hostname: "127.0.0.1",
  port: 8888,
  maxConns: 10_000,
  idleTimeout: 0,
  gracePeriod: 5000,
  logLevel: "info",
  style: "callbacks",
};

/**
 * Starts an echo server.
 *
 * @example Usage
 * ```ts
 * import { serve } from "./main.ts";
 * import { assertEquals } from "@std/assert";
 *
 * const server = serve({ port: 0, logLevel: "quiet", style: "async" });
 * const conn = await Deno.connect({ port: server.addr.port });
 * await conn.write(new TextEncoder().encode("hello"));
 * const reply = new Uint8Array(5);
 * assertEquals(await conn.read(reply), 5);
 * conn.close();
 * await server.close();
 * ```
 *
 * @param options Where to listen, limits, logging and style.
 * @returns The running server.
 * @throws What `Deno.listen` throws: `Deno.errors.AddrInUse`, `NotCapable`...
 */
export function serve(options: ServeOptions = {}): Server {
  const { hostname, port, maxConns, idleTimeout, gracePeriod, logLevel, style } = withDefaults(
    options,
    DEFAULTS,
  );
  const { trace } = options;
  const logs = logLevel !== "quiet";
  const verbose = logLevel === "verbose";

  const listener = Deno.listen({ hostname, port });
  const selector = new Selector({ trace });
  const clients = new Set<Client>();
  const stats: ServerStats = {
    get open() {
      return clients.size;
    },
    accepted: 0,
    bytes: 0,
    get queued() {
      let queued = 0;
      for (const client of clients) queued += client.queued;
      return queued;
    },
  };
  const stopped = Promise.withResolvers<void>(); // settles when the engine's run() ends
  let idleTimer: ReturnType<typeof setInterval> | undefined = undefined;
  let outOfDescriptors = false;
  let shuttingDown = false;
  // The style's half of the server; both styles are defined below, as functions.
  const engine = style === "async" ? coroutines() : callbacks();

  // What both styles do with a connection: welcome it, count it, count its
  // bytes, close it.

  /** A connection was accepted: logs it and makes its record. */
  function welcome(conn: Deno.Conn): Peer {
    if (outOfDescriptors) {
      outOfDescriptors = false;
      console.error("accepting again");
    }
    (conn as Deno.TcpConn).setNoDelay(true); // Deno leaves Nagle on: small echoes would wait ~40 ms
    if (logs) console.log(`${formatAddr(conn.remoteAddr)} connected`);
    stats.accepted++;
    return { bytes: 0, lastRead: idleTimeout && performance.now() };
  }

  /** The connection is served: count it, and stop accepting at the cap. */
  function opened(client: Client): void {
    clients.add(client);
    if (clients.size >= maxConns) {
      engine.accepting(false); // the kernel's backlog holds newcomers
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

  /** Bytes arrived, about to be echoed. */
  function received(client: Client, data: Uint8Array): void {
    if (verbose) console.log(`${peerOf(client)} echoing ${data.length} bytes`);
    client.data.bytes += data.length;
    stats.bytes += data.length;
    if (idleTimeout) client.data.lastRead = performance.now();
  }

  function close(client: Client, error?: unknown): void {
    if (!clients.delete(client)) return; // closed already
    engine.release(client);
    if (logs) {
      const { bytes } = client.data;
      console.log(
        error
          ? `${peerOf(client)} closed after ${bytes} bytes: ${describe(error)}`
          : `${peerOf(client)} closed, ${bytes} bytes echoed`,
      );
    }
    if (shuttingDown) {
      if (clients.size === 0) engine.stop();
    } else if (clients.size === maxConns - 1) {
      engine.accepting(true);
    }
  }

  function closeIdle(): void {
    const now = performance.now();
    for (const client of clients) {
      if (now - client.data.lastRead > idleTimeout) {
        close(client, new Error(`idle for over ${idleTimeout / 1000} s`));
      }
    }
  }

  // Graceful shutdown: write back what was read, then half-close and wait for
  // the peer's EOF (closing with unread input would send a reset, which can
  // destroy echoed bytes still in flight); input that arrives now is dropped.
  function shutdown(): Promise<void> {
    if (shuttingDown) return stopped.promise;
    shuttingDown = true;
    clearInterval(idleTimer);
    engine.closeListener();
    if (clients.size === 0) engine.stop();
    for (const client of clients) engine.drain(client);
    const graceTimer = setTimeout(() => {
      for (const client of clients) close(client, new Error("grace period over"));
    }, gracePeriod);
    const stopTimer = () => clearTimeout(graceTimer);
    stopped.promise.then(stopTimer, stopTimer);
    return stopped.promise;
  }

  // The lesson's style: callbacks.
  function callbacks(): Engine {
    // The listener's callback: the lesson's accept().
    function accept(key: SelectorKey, _mask: number): void {
      let conn: Deno.Conn;
      try {
        conn = key.accept(); // should be ready
      } catch (error) {
        return acceptFailed(error);
      }
      opened(selector.register(conn, READ, read, welcome(conn)));
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
        received(key, data);
        key.send(data); // queued: the loop writes every byte
      } else {
        // EOF: the peer is done sending. Write back what is queued, then close.
        selector.modify(key.resource, WRITE, flushed);
      }
    }

    function flushed(key: ClientKey, _mask: number): void {
      close(key, key.error);
    }

    function drained(key: ClientKey, _mask: number): void {
      if (key.error) return close(key, key.error);
      (key.resource as Deno.Conn).closeWrite().catch((error) => close(key, error));
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

    return {
      run() {
        selector.register(listener, READ, accept);
        return selector.run();
      },
      accepting(on) {
        selector.modify(listener, on ? READ : 0);
      },
      closeListener() {
        selector.unregister(listener);
        listener.close();
      },
      release(client) {
        selector.unregister(client.resource);
        client.resource.close();
      },
      drain(client) {
        selector.modify(client.resource, WRITE, drained);
      },
      stop() {
        selector.close();
      },
    };
  }

  // The lesson's next step: coroutines on the same loop.
  function coroutines(): Engine {
    const loop = new AsyncLoop({
      selector,
      onError: (error) => console.error(`unexpected error: ${describe(error)}`),
    });
    /** Set while at the connection cap: the accept loop waits for it. */
    let slotFree: PromiseWithResolvers<void> | undefined = undefined;

    // The accept loop: the lesson's accept(), as a coroutine.
    async function acceptLoop(): Promise<void> {
      while (!shuttingDown) {
        if (slotFree) await slotFree.promise;
        if (shuttingDown) return;
        let conn: Connection<Peer>;
        try {
          conn = await loop.accept(listener) as Connection<Peer>;
        } catch (error) {
          if (shuttingDown) return;
          acceptFailed(error);
          continue;
        }
        conn.data = welcome(conn.resource);
        opened(conn);
        loop.spawn(echo(conn));
      }
    }

    // A connection's life as one coroutine, through the same states as the
    // callbacks: reading, finishing at EOF, and at shutdown draining and
    // half-closed; close() on any error.
    async function echo(conn: Connection<Peer>): Promise<void> {
      try {
        for (let data; !shuttingDown && (data = await loop.recv(conn)) !== null;) {
          received(conn, data);
          await loop.send(conn, data); // waits only while the peer does not read
        }
        if (!shuttingDown) { // finishing: write back what is queued, then close
          await loop.drain(conn);
          return close(conn, conn.error);
        }
      } catch (error) {
        if (!(shuttingDown && error instanceof Deno.errors.Interrupted)) return close(conn, error);
      }
      if (!clients.has(conn)) return; // the grace period cut it
      try { // draining, then half-closed
        await loop.drain(conn);
        await conn.resource.closeWrite();
        while ((await loop.recv(conn)) !== null); // drop input until the peer's EOF
        close(conn);
      } catch (error) {
        close(conn, error);
      }
    }

    return {
      run() {
        loop.spawn(acceptLoop());
        return loop.run();
      },
      accepting(on) {
        if (!on) slotFree ??= Promise.withResolvers();
        else {
          slotFree?.resolve();
          slotFree = undefined;
        }
      },
      closeListener() {
        loop.abort(listener); // interrupts the waiting accept()
        slotFree?.resolve();
      },
      release(client) {
        loop.abort(client as Connection); // interrupts what its coroutine waits for
      },
      drain(client) {
        loop.interrupt(client as Connection); // its coroutine goes on to drain it
      },
      stop() {
        loop.stop();
      },
    };
  }

  if (idleTimeout > 0) idleTimer = setInterval(closeIdle, Math.min(1000, idleTimeout / 2));
  engine.run().finally(() => {
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

/** --trace prints at most this many lines a second, then says how many it left out. */
const TRACE_LINES_PER_SECOND = 200;

const USAGE =
  `usage: deno run --allow-net=127.0.0.1 main.ts [--host H] [--port N] [--max-conns N] [--idle-timeout S] [--style callbacks|async] [--trace] [--verbose | --quiet]`;

const HELP = `A TCP echo server: sends back every byte it receives.

${USAGE}

  --host H           address to listen on (default ${DEFAULTS.hostname}; 0.0.0.0 exposes it to the network)
  --port N           port, 0 picks a free one (default ${DEFAULTS.port})
  --max-conns N      connections served at once; more wait in the kernel's backlog (default ${DEFAULTS.maxConns})
  --idle-timeout S   close connections idle for S seconds (default ${DEFAULTS.idleTimeout}: never)
  --style STYLE      callbacks (the lesson's accept and read callbacks) or async (coroutines
                     on the same loop) (default ${DEFAULTS.style})
  --trace            print what the event loop does, turn by turn (at most ${TRACE_LINES_PER_SECOND} lines a second)
  --verbose          also log every echo
  --quiet            log errors only
  --help             show this help

SIGINT or SIGTERM shuts down gracefully: a second one exits at once.`;

const FLAGS = {
  host: { type: "text" },
  port: { type: "integer", min: 0, max: 65535 },
  "max-conns": { type: "integer", min: 1 },
  "idle-timeout": { type: "number", min: 0 },
  style: { type: "text" },
  trace: { type: "boolean" },
  verbose: { type: "boolean" },
  quiet: { type: "boolean" },
} as const;

/** Reads the command line into serve() options, or throws a UsageError. */
function optionsFrom(flags: Flags<typeof FLAGS>): ServeOptions {
  if (flags.verbose && flags.quiet) {
    throw new UsageError("--verbose and --quiet do not go together");
  }
  const { style } = flags;
  if (style !== undefined && style !== "callbacks" && style !== "async") {
    throw new UsageError(`--style must be callbacks or async, got "${style}"`);
  }
  const idleSeconds = flags["idle-timeout"];
  return {
    hostname: flags.host,
    port: flags.port,
    maxConns: flags["max-conns"],
    idleTimeout: idleSeconds === undefined ? undefined : idleSeconds * 1000,
    logLevel: flags.quiet ? "quiet" : flags.verbose ? "verbose" : undefined,
    style,
    trace: flags.trace ? createTracer({ maxPerSecond: TRACE_LINES_PER_SECOND }) : undefined,
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
