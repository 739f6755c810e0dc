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
import { AsyncLoop, type Connection, type DatagramSocket } from "./async_loop.ts";
import { type Flags, parseCommandLine, UsageError, withDefaults } from "./cli.ts";
import { createTracer, formatAddr } from "./trace.ts";
import { ReplyGuard } from "./udp_guard.ts";
import { type Log, type LogFormat, logTo, plural } from "./log.ts";
import { runWorkers } from "./workers.ts";

/** How much the server prints. */
export type LogLevel = "quiet" | "info" | "verbose";

/** How the server is written: the lesson's callbacks, or coroutines on the same loop. */
export type Style = "callbacks" | "async";

export type { LogFormat } from "./log.ts";

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
  /** `text`, or `json`: `{"time", "level", "message"}` per line. @default {"text"} */
  logFormat?: LogFormat;
  /** Callbacks or coroutines. @default {"callbacks"} */
  style?: Style;
  /** Also serve UDP echo on the same address and port (needs `--unstable-net`). @default {false} */
  udp?: boolean;
  /** UDP replies per second to one source address, and its burst. @default {100} */
  udpRate?: number;
  /** Serve on this Unix socket instead of TCP (hostname and port are then unused). */
  unixPath?: string;
  /**
   * Share the port with other processes that set it too (SO_REUSEPORT: the
   * kernel spreads connections over them). Linux only; needs `--unstable-net`.
   * @default {false}
   */
  reusePort?: boolean;
  /** Where log lines go, instead of stdout and stderr in `logFormat`. */
  log?: Log;
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
  /** UDP datagrams echoed. */
  datagrams: number;
  /** UDP datagrams not answered: over a source's rate, or from a responder's port. */
  dropped: number;
  /** The most connections open at once. */
  peak: number;
  /** Connections that ended in an error (a reset, a timeout, the grace period...). */
  failed: number;
  /** performance.now() when the server started. */
  readonly started: number;
}

/** A running echo server. */
export interface Server {
  /** The address it listens on, with the real port, or its Unix socket. */
  readonly addr: Deno.NetAddr | Deno.UnixAddr;
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
  /** Its number among the connections accepted, to tell Unix socket peers apart in logs. */
  id: number;
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
  /** Starts echoing datagrams on the UDP socket. */
  serveDatagrams(socket: Deno.DatagramConn): void;
  /** At shutdown: send the replies queued, then close the UDP socket and call datagramsClosed(). */
  closeDatagrams(socket: Deno.DatagramConn): void;
  /** Ends run(): the last connection is closed. */
  stop(): void;
}

/** The peer's address of a connection, for log lines; a Unix socket's peers have none, so a number. */
function peerOf(client: Client): string {
  const { remoteAddr, localAddr } = client.resource as Deno.Conn;
  return remoteAddr.transport === "unix"
    ? `${formatAddr(localAddr)}#${client.data.id}`
    : formatAddr(remoteAddr);
}

/** An error as a short phrase: its Deno class name, or its message. */
function describe(error: unknown): string {
  if (error instanceof Error) {
    const known = error.name !== "Error" ? `${error.name}: ` : "";
    return `${known}${error.message}`;
  }
  return String(error);
}

/**
 * Counters for OpenTelemetry, when Deno exports to a collector (`OTEL_DENO=true`;
 * Deno then exports the log lines too); undefined otherwise, and then nothing
 * is counted.
 */
function openTelemetry() {
  let meter;
  try {
    meter = Deno.telemetry.meterProvider.getMeter("echo");
  } catch {
    return undefined; // "otel not initialized": OTEL_DENO is not set
  }
  return {
    accepted: meter.createCounter("echo.connections.accepted", {
      description: "Connections accepted",
    }),
    open: meter.createUpDownCounter("echo.connections.open", {
      description: "Connections open",
    }),
    bytes: meter.createCounter("echo.bytes", { description: "Bytes echoed over streams" }),
    datagrams: meter.createCounter("echo.datagrams", { description: "UDP datagrams echoed" }),
  };
}

/** What {@linkcode serve} does when an option is not given (no trace); main.ts's flags share them. */
const DEFAULTS: Required<Omit<ServeOptions, "trace" | "log">> = {
  hostname: "127.0.0.1",
  port: 8888,
  maxConns: 10_000,
  idleTimeout: 0,
  gracePeriod: 5000,
  logLevel: "info",
  logFormat: "text",
  style: "callbacks",
  udp: false,
  udpRate: 100,
  unixPath: "",
  reusePort: false,
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
 * const conn = await Deno.connect({ port: (server.addr as Deno.NetAddr).port });
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
  const {
    hostname,
    port,
    maxConns,
    idleTimeout,
    gracePeriod,
    logLevel,
    logFormat,
    style,
    udp,
    udpRate,
    unixPath,
    reusePort,
  } = withDefaults(options, DEFAULTS);
  const { trace } = options;
  const logs = logLevel !== "quiet";
  const verbose = logLevel === "verbose";
  const log = options.log ?? logTo(logFormat);
  const metrics = openTelemetry();

  const listener = unixPath
    ? Deno.listen({ transport: "unix", path: unixPath })
    : Deno.listen({ hostname, port, ...(reusePort ? { reusePort } : {}) });
  let datagrams: Deno.DatagramConn | undefined;
  try {
    // UDP on the port TCP got (port 0 picks one for both).
    const udpPort = (listener.addr as Deno.NetAddr).port;
    if (udp) datagrams = Deno.listenDatagram({ transport: "udp", hostname, port: udpPort });
  } catch (error) {
    listener.close();
    throw error;
  }
  // Deno leaves a Unix socket's file behind when the listener closes: remove it
  // then, if it is still ours (same inode: nobody replaced it meanwhile).
  const socketFile = unixPath ? Deno.lstatSync(unixPath).ino : null;
  const closeListener = () => {
    try {
      listener.close();
    } catch {
      // closed already: async_loop.ts's abort() closes what it unregisters
    }
    try {
      if (socketFile !== null && Deno.lstatSync(unixPath).ino === socketFile) {
        Deno.removeSync(unixPath);
      }
    } catch {
      // gone already
    }
  };
  const guard = new ReplyGuard({ rate: udpRate });
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
    datagrams: 0,
    dropped: 0,
    peak: 0,
    failed: 0,
    started: performance.now(),
  };
  const stopped = Promise.withResolvers<void>(); // settles when the engine's run() ends
  let idleTimer: ReturnType<typeof setInterval> | undefined = undefined;
  let outOfDescriptors = false;
  let shuttingDown = false;
  let droppedLogged = 0; // stats.dropped when the last drop line was printed
  let udpOpen = datagrams !== undefined;
  // The style's half of the server; both styles are defined below, as functions.
  const engine = style === "async" ? coroutines() : callbacks();

  // What both styles do with a connection: welcome it, count it, count its
  // bytes, close it.

  /** A connection was accepted: logs it and makes its record. */
  function welcome(conn: Deno.Conn): Peer {
    if (outOfDescriptors) {
      outOfDescriptors = false;
      log.error("accepting again");
    }
    // Deno leaves Nagle on: small echoes would wait ~40 ms. (Unix sockets have no Nagle.)
    if (conn.remoteAddr.transport === "tcp") (conn as Deno.TcpConn).setNoDelay(true);
    const peer = { id: ++stats.accepted, bytes: 0, lastRead: idleTimeout && performance.now() };
    if (logs) log.info(`${peerOf({ resource: conn, queued: 0, data: peer })} connected`);
    metrics?.accepted.add(1);
    metrics?.open.add(1);
    return peer;
  }

  /** The connection is served: count it, and stop accepting at the cap. */
  function opened(client: Client): void {
    clients.add(client);
    stats.peak = Math.max(stats.peak, clients.size);
    if (clients.size >= maxConns) {
      engine.accepting(false); // the kernel's backlog holds newcomers
      if (logs) log.info(`${maxConns} connections open: new ones wait until one closes`);
    }
  }

  function acceptFailed(error: unknown): void {
    if (/too many open files/i.test(String(error))) {
      if (!outOfDescriptors) {
        outOfDescriptors = true;
        log.error(
          "out of file descriptors: pausing accepts until connections close (raise `ulimit -n` or lower --max-conns)",
        );
      }
      return; // loop.ts backs off before the next accept
    }
    log.error(`accept failed: ${describe(error)}`);
  }

  /** Bytes arrived, about to be echoed. */
  function received(client: Client, data: Uint8Array): void {
    if (verbose) log.info(`${peerOf(client)} echoing ${data.length} bytes`);
    client.data.bytes += data.length;
    stats.bytes += data.length;
    metrics?.bytes.add(data.length);
    if (idleTimeout) client.data.lastRead = selector.now;
  }

  function close(client: Client, error?: unknown): void {
    if (!clients.delete(client)) return; // closed already
    engine.release(client);
    metrics?.open.add(-1);
    if (error) stats.failed++;
    if (logs) {
      const { bytes } = client.data;
      log.info(
        error
          ? `${peerOf(client)} closed after ${bytes} bytes: ${describe(error)}`
          : `${peerOf(client)} closed, ${bytes} bytes echoed`,
      );
    }
    if (shuttingDown) {
      if (clients.size === 0 && !udpOpen) engine.stop();
    } else if (clients.size === maxConns - 1) {
      engine.accepting(true);
    }
  }

  /**
   * A datagram arrived: whether to echo it (see udp_guard.ts). Drops are
   * summed up in one log line a second at most, whatever the flood.
   */
  function answer(datagram: Uint8Array, from: Deno.Addr): boolean {
    if (guard.check(from, selector.now) !== "reply") {
      stats.dropped++;
      return false;
    }
    if (verbose) log.info(`udp ${formatAddr(from)} echoing ${datagram.length} bytes`);
    stats.datagrams++;
    metrics?.datagrams.add(1);
    return true;
  }

  function logDrops(): void {
    const dropped = stats.dropped - droppedLogged;
    if (dropped === 0) return;
    droppedLogged = stats.dropped;
    if (logs) {
      log.info(
        `udp: ${dropped} datagrams not answered (over ${udpRate} replies/s from one address, or from a responder's port)`,
      );
    }
  }

  /** The UDP socket is closed (at shutdown). */
  function datagramsClosed(): void {
    udpOpen = false;
    logDrops();
    if (shuttingDown && clients.size === 0) engine.stop();
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
    clearInterval(dropsTimer);
    engine.closeListener();
    if (datagrams) engine.closeDatagrams(datagrams);
    if (clients.size === 0 && !udpOpen) engine.stop();
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

    // UDP: one callback, as in the lesson's read(), with recvfrom() and sendto().
    function echoDatagram(key: SelectorKey, _mask: number): void {
      let datagram: Uint8Array, from: Deno.Addr;
      try {
        [datagram, from] = key.recvfrom(); // should be ready
      } catch (error) {
        return log.error(`udp receive failed: ${describe(error)}`); // loop.ts tries again
      }
      if (answer(datagram, from)) key.sendto(datagram, from);
    }

    function datagramsFlushed(key: SelectorKey, _mask: number): void {
      selector.unregister(key.resource);
      key.resource.close();
      datagramsClosed();
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
        closeListener();
      },
      release(client) {
        selector.unregister(client.resource);
        client.resource.close();
      },
      drain(client) {
        selector.modify(client.resource, WRITE, drained);
      },
      serveDatagrams(socket) {
        selector.register(socket, READ, echoDatagram);
      },
      closeDatagrams(socket) {
        selector.modify(socket, WRITE, datagramsFlushed); // no more reads; send what is queued
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
      onError: (error) => log.error(`unexpected error: ${describe(error)}`),
    });
    /** Set while at the connection cap: the accept loop waits for it. */
    let slotFree: PromiseWithResolvers<void> | undefined = undefined;
    /** The UDP socket, with --udp. */
    let udpSocket: DatagramSocket | undefined = undefined;

    // UDP: one coroutine for the socket, with recvfrom() and sendto().
    async function echoDatagrams(socket: DatagramSocket): Promise<void> {
      while (!shuttingDown) {
        let datagram: Uint8Array, from: Deno.Addr;
        try {
          [datagram, from] = await loop.recvfrom(socket);
        } catch (error) {
          if (shuttingDown) return;
          log.error(`udp receive failed: ${describe(error)}`);
          continue; // loop.ts pauses before it receives again
        }
        if (answer(datagram, from)) await loop.sendto(socket, datagram, from);
      }
    }

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
        closeListener(); // and removes a Unix socket's file
        slotFree?.resolve();
      },
      release(client) {
        loop.abort(client as Connection); // interrupts what its coroutine waits for
      },
      drain(client) {
        loop.interrupt(client as Connection); // its coroutine goes on to drain it
      },
      serveDatagrams(socket) {
        udpSocket = loop.adopt(socket);
        loop.spawn(echoDatagrams(udpSocket));
      },
      closeDatagrams() {
        loop.close(udpSocket!).then(datagramsClosed); // sends what is queued first
      },
      stop() {
        loop.stop();
      },
    };
  }

  if (idleTimeout > 0) idleTimer = setInterval(closeIdle, Math.min(1000, idleTimeout / 2));
  const dropsTimer = datagrams ? setInterval(logDrops, 1000) : undefined;
  if (datagrams) engine.serveDatagrams(datagrams);
  engine.run().finally(() => {
    clearInterval(idleTimer);
    clearInterval(dropsTimer);
    if (!shuttingDown) {
      closeListener();
      if (udpOpen) datagrams?.close();
    }
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
  `usage: deno run --allow-net=127.0.0.1 main.ts [--host H] [--port N] [--udp [--udp-rate N]] [--unix PATH] [--max-conns N] [--idle-timeout S] [--style callbacks|async] [--trace] [--log-format text|json] [--verbose | --quiet] [--workers N|auto]`;

const HELP = `An echo server (RFC 862): sends back every byte it receives, over TCP, and
over UDP or a Unix socket if asked.

${USAGE}

  --host H           address to listen on (default ${DEFAULTS.hostname}; 0.0.0.0 exposes it to the network)
  --port N           port, 0 picks a free one (default ${DEFAULTS.port})
  --max-conns N      connections served at once; more wait in the kernel's backlog (default ${DEFAULTS.maxConns})
  --idle-timeout S   close connections idle for S seconds (default ${DEFAULTS.idleTimeout}: never)
  --udp              also echo UDP datagrams on the same host and port (needs --unstable-net)
  --udp-rate N       UDP replies per second to one source address (default ${DEFAULTS.udpRate})
  --unix PATH        serve on a Unix socket instead of TCP (needs --allow-read, --allow-write
                     and --allow-net=unix: for PATH); a stale socket file is replaced
  --style STYLE      callbacks (the lesson's accept and read callbacks) or async (coroutines
                     on the same loop) (default ${DEFAULTS.style})
  --trace            print what the event loop does, turn by turn (at most ${TRACE_LINES_PER_SECOND} lines a second)
  --log-format F     text, or json: one {"time", "level", "message"} object per line
                     (default ${DEFAULTS.logFormat})
  --verbose          also log every echo
  --quiet            log errors only
  --workers N        N processes share the port (SO_REUSEPORT, Linux), auto: one per CPU;
                     the parent restarts a worker that dies and drains all on a signal.
                     Needs --allow-run=deno and --unstable-net (deno task start has both);
                     each worker gets only --allow-net for its host. --max-conns is per worker,
                     and the first worker serves --udp
  --worker ID        set by --workers on each worker it starts: share the port, log JSON
                     lines for the parent, drain when stdin closes
  --help             show this help

SIGINT or SIGTERM shuts down gracefully: a second one exits at once.`;

const FLAGS = {
  host: { type: "text" },
  port: { type: "integer", min: 0, max: 65535 },
  "max-conns": { type: "integer", min: 1 },
  "idle-timeout": { type: "number", min: 0 },
  udp: { type: "boolean" },
  "udp-rate": { type: "integer", min: 1 },
  unix: { type: "text" },
  style: { type: "text" },
  trace: { type: "boolean" },
  "log-format": { type: "text" },
  verbose: { type: "boolean" },
  quiet: { type: "boolean" },
  workers: { type: "text" },
  worker: { type: "integer", min: 1 },
} as const;

/** What the command line asks for: the server's options, and how many processes serve. */
interface CommandLine extends ServeOptions {
  /** Worker processes sharing the port (1: this process serves). */
  workers: number;
  /** Set in a worker that `--workers` started: its number. */
  worker?: number;
}

/** --workers N, or auto: one per CPU. More than 4 per CPU would only compete for them. */
function workerCount(text: string | undefined): number {
  const cpus = navigator.hardwareConcurrency;
  if (text === undefined) return 1;
  if (text === "auto") return cpus;
  const count = Number(text);
  if (!Number.isInteger(count) || count < 1 || count > 4 * cpus) {
    throw new UsageError(
      `--workers must be auto or a whole number from 1 to ${4 * cpus} (4 per CPU), got "${text}"`,
    );
  }
  return count;
}

/** Reads the command line into serve() options, or throws a UsageError. */
function optionsFrom(flags: Flags<typeof FLAGS>): CommandLine {
  if (flags.verbose && flags.quiet) {
    throw new UsageError("--verbose and --quiet do not go together");
  }
  const { style } = flags;
  if (style !== undefined && style !== "callbacks" && style !== "async") {
    throw new UsageError(`--style must be callbacks or async, got "${style}"`);
  }
  if (flags.unix !== undefined) {
    if (flags.host !== undefined || flags.port !== undefined || flags.udp) {
      throw new UsageError("--unix serves on a socket file: not with --host, --port or --udp");
    }
  }
  if (flags["udp-rate"] !== undefined && !flags.udp) {
    throw new UsageError("--udp-rate needs --udp");
  }
  const logFormat = flags["log-format"];
  if (logFormat !== undefined && logFormat !== "text" && logFormat !== "json") {
    throw new UsageError(`--log-format must be text or json, got "${logFormat}"`);
  }
  const workers = workerCount(flags.workers);
  if (workers > 1 && flags.unix !== undefined) {
    throw new UsageError("--workers share a TCP port: not with --unix");
  }
  if (flags.worker !== undefined && flags.workers !== undefined) {
    throw new UsageError("--worker is set by --workers for each worker it starts: not both");
  }
  const idleSeconds = flags["idle-timeout"];
  return {
    workers,
    worker: flags.worker,
    logFormat,
    hostname: flags.host,
    port: flags.port,
    udp: flags.udp,
    udpRate: flags["udp-rate"],
    unixPath: flags.unix,
    maxConns: flags["max-conns"],
    idleTimeout: idleSeconds === undefined ? undefined : idleSeconds * 1000,
    logLevel: flags.quiet ? "quiet" : flags.verbose ? "verbose" : undefined,
    style,
    trace: flags.trace ? createTracer({ maxPerSecond: TRACE_LINES_PER_SECOND }) : undefined,
  };
}

/** Why listening failed, in one line with what to do about it. */
function listenError(error: unknown, options: typeof DEFAULTS): string {
  const { hostname: host, port, unixPath: path, udp } = options;
  if (path) {
    if (error instanceof Deno.errors.NotCapable) {
      return `no permission to use the socket ${path}: run with --allow-read=${path} --allow-write=${path} --allow-net=unix:${path}`;
    }
    return `cannot listen on ${path}: ${describe(error)}`;
  }
  const where = `${host}:${port}`;
  if (error instanceof Deno.errors.AddrInUse) {
    const protocols = udp ? " (for TCP or UDP)" : "";
    return `port ${port} on ${host} is already in use${protocols}: stop the other server or choose another port with --port`;
  }
  if (error instanceof Deno.errors.NotCapable) {
    const task = host === "127.0.0.1" ? " (deno task start does)" : "";
    return `no permission to listen on ${where}: run with --allow-net=${host}${task}`;
  }
  if (error instanceof Deno.errors.AddrNotAvailable) {
    return `cannot listen on ${host}: it is not an address of this machine (check --host)`;
  }
  if (error instanceof Deno.errors.PermissionDenied) {
    // Only for a user without the privilege: the tests run as root, which may bind any port.
    return `not allowed to listen on ${where}: ports below 1024 need privileges; choose another with --port`;
  }
  if (/failed to lookup address/i.test(String(error))) {
    return `cannot resolve host "${host}": check --host`;
  }
  return `cannot listen on ${where}: ${describe(error)}`;
}

/**
 * Makes way for a Unix socket at `path`: a socket file nothing listens on (a
 * crashed server's) is removed; anything else is left alone.
 *
 * @returns Why the server cannot use `path`, or undefined if it can.
 */
async function claimUnixPath(
  path: string,
  log: Log | undefined,
): Promise<string | undefined> {
  let info: Deno.FileInfo;
  try {
    info = await Deno.lstat(path);
  } catch (error) {
    if (error instanceof Deno.errors.NotFound) return undefined; // free
    throw error; // e.g. no permission: reported as for listening
  }
  if (!info.isSocket) {
    const what = info.isDirectory ? "a directory" : info.isFile ? "a regular file" : "not a socket";
    return `${path} is ${what}: choose another path with --unix (it was left untouched)`;
  }
  try {
    (await Deno.connect({ transport: "unix", path })).close();
    return `another server is listening on ${path}: stop it or choose another path with --unix`;
  } catch (error) {
    if (!(error instanceof Deno.errors.ConnectionRefused)) throw error;
  }
  await Deno.remove(path); // stale: left by a server that did not shut down
  log?.info(`removed the stale socket file ${path}: nothing was listening on it`);
  return undefined;
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
    { name: "main.ts", help: HELP },
    optionsFrom,
  );
  if ("exit" in parsed) return parsed.exit;
  const { workers, worker, ...serveOptions } = parsed.options;
  const options = withDefaults(serveOptions, DEFAULTS);
  const unstable = typeof Deno.listenDatagram === "function"; // --unstable-net was given
  if (options.udp && !unstable) {
    console.error(
      "main.ts: --udp needs Deno's unstable UDP API: add --unstable-net to deno run (deno task start has it)",
    );
    return 2;
  }
  if (workers > 1) return await startWorkers(options, workers, serveOptions.trace !== undefined);
  if (worker !== undefined && !unstable) {
    console.error("main.ts: --worker shares its port (SO_REUSEPORT): add --unstable-net");
    return 2;
  }
  // A worker logs JSON lines for its parent, and always says when it listens and what it served.
  const log = worker !== undefined
    ? logTo("json", { worker })
    : options.logLevel === "quiet"
    ? undefined
    : logTo(options.logFormat);
  const forParent = (fields: Record<string, unknown>) => worker === undefined ? {} : fields;
  let server: Server;
  try {
    const unavailable = options.unixPath && await claimUnixPath(options.unixPath, log);
    if (unavailable) {
      console.error(`main.ts: ${unavailable}`);
      return 1;
    }
    const shared = worker === undefined ? {} : { reusePort: true, log };
    server = serve({ ...options, ...shared });
  } catch (error) {
    console.error(`main.ts: ${listenError(error, options)}`);
    return 1;
  }
  // The first SIGINT or SIGTERM shuts down gracefully; a second one exits at once,
  // with the status a shell gives a process killed by that signal. A worker
  // leaves SIGINT (which a terminal sends its parent too) to its parent, which
  // stops it by closing its stdin.
  let stopping = false;
  const stop = (how: string) => {
    stopping = true;
    log?.info(`shutting down: ${plural(server.stats.open, "connection")} to finish (${how})`);
    server.close();
  };
  const signals = [["SIGINT", 130], ["SIGTERM", 143]] as const;
  const handlers = signals.map(([signal, status]) => {
    const handler = () => {
      if (worker !== undefined && signal === "SIGINT") return;
      if (stopping) Deno.exit(status);
      stop(`${signal} again to force`);
    };
    Deno.addSignalListener(signal, handler);
    return () => Deno.removeSignalListener(signal, handler);
  });
  if (worker !== undefined) {
    untilEnd(Deno.stdin).then(() => stopping || stop("the parent closed stdin"));
  }
  // Announce only now: whoever waits for this line may signal at once.
  const { addr } = server;
  const address = formatAddr(addr);
  const exposed = "hostname" in addr && !isLoopback(addr.hostname);
  const port = "port" in addr ? addr.port : undefined;
  log?.info(
    `listening on ${address}${exposed ? " (reachable from the network)" : ""}`,
    forParent({ event: "listening", address, port, exposed }),
  );
  await server.finished;
  for (const remove of handlers) remove();
  const { accepted, bytes, failed } = server.stats;
  log?.info(
    summary(server.stats, options.udp),
    forParent({ event: "summary", stats: { accepted, bytes, failed } }),
  );
  return 0;
}

/** Resolves when a stream (a worker's stdin) ends: its parent closed it, or died. */
async function untilEnd(stream: { read(p: Uint8Array): Promise<number | null> }): Promise<void> {
  const buffer = new Uint8Array(64);
  try {
    while (await stream.read(buffer) !== null); // anything written is ignored
  } catch {
    // an error ends it too
  }
}

/**
 * `--workers N`: this process starts N workers (`main.ts --worker ID`) on one
 * port and watches them (workers.ts). Each gets exactly what it needs: the
 * network on its host, and `--unstable-net` for SO_REUSEPORT.
 */
async function startWorkers(
  options: typeof DEFAULTS,
  count: number,
  trace: boolean,
): Promise<number> {
  if (Deno.build.os !== "linux") {
    // Only off Linux, where no test of ours runs.
    console.error(
      "main.ts: --workers share a port through SO_REUSEPORT, which Deno offers on Linux only: run one server per port instead",
    );
    return 1;
  }
  if ((await Deno.permissions.query({ name: "run", command: "deno" })).state !== "granted") {
    console.error(
      "main.ts: --workers starts its workers with deno: add --allow-run=deno (deno task start has it)",
    );
    return 1;
  }
  const { hostname, maxConns, idleTimeout, style, logLevel, udp, udpRate } = options;
  const net = hostname.includes(":") ? `[${hostname}]` : hostname;
  const level = logLevel === "quiet" ? ["--quiet"] : logLevel === "verbose" ? ["--verbose"] : [];
  const flags = [
    ...["--host", hostname, "--max-conns", `${maxConns}`, "--style", style],
    ...["--idle-timeout", `${idleTimeout / 1000}`, ...level, ...(trace ? ["--trace"] : [])],
  ];
  return await runWorkers({
    count,
    port: options.port,
    logFormat: options.logFormat,
    quiet: logLevel === "quiet",
    command: (id, port) => [
      ...["run", `--allow-net=${net}`, "--unstable-net", import.meta.url, ...flags],
      ...["--port", `${port}`, "--worker", `${id}`],
      // UDP is one socket: the first worker serves it.
      ...(udp && id === 1 ? ["--udp", "--udp-rate", `${udpRate}`] : []),
    ],
  });
}

/** The shutdown summary: one line for the whole run. */
function summary(stats: ServerStats, udp: boolean): string {
  const seconds = ((performance.now() - stats.started) / 1000).toFixed(1);
  const datagrams = udp
    ? `, ${plural(stats.datagrams, "datagram")} echoed and ${stats.dropped} not answered`
    : "";
  return `served ${plural(stats.accepted, "connection")} (at most ${stats.peak} at once) in ` +
    `${seconds} s: ${plural(stats.bytes, "byte")} echoed${datagrams}; ` +
    `${plural(stats.failed, "connection")} ended in an error`;
}

if (import.meta.main) Deno.exit(await main(Deno.args));
