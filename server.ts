/**
 * The echo server (RFC 862) that both styles of the lesson share: where it
 * listens, limits, logs, counters, the idle timeout, UDP's defences and a
 * graceful shutdown. The bytes are moved by an engine in one style,
 * callbacks.ts or coroutines.ts (engine.ts is the contract between them).
 *
 * @module
 */

import {
  type BaseSelector,
  type ConnResource,
  type DatagramResource,
  type ListenerResource,
  Selector,
} from "./loop.ts";
import { Fairness } from "./fairness.ts";
import { EpollSelector } from "./epoll.ts";
import { type AnyTraceEvent, formatAddr } from "./trace.ts";
import { ReplyGuard } from "./udp_guard.ts";
import { describeError, type Log, type LogFormat, logTo } from "./log.ts";
import { withDefaults } from "./cli.ts";
import type { ConnInfo, EchoServer, Engine, ServedConn } from "./engine.ts";
import { callbacks } from "./callbacks.ts";
import { coroutines } from "./coroutines.ts";

export type { Log, LogFormat } from "./log.ts";
export type { AnyTraceEvent } from "./trace.ts";

/** How much the server prints. */
export type LogLevel = "quiet" | "info" | "verbose";

/**
 * How the server is written: the lesson's callbacks, or coroutines on the same
 * loop, or its first step, blocking: one connection at a time.
 */
export type Style = "callbacks" | "async" | "blocking";

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
  /** Callbacks, coroutines, or one connection at a time (`blocking`, not with `udp`). @default {"callbacks"} */
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
  /**
   * Hold back new reads while others starve (fairness.ts), so that no
   * connection waits long for its echo when the process saturates its CPU.
   * @default {true}
   */
  fairness?: boolean;
  /**
   * The selector to serve on and the sockets it watches, made for the given
   * trace function and fairness (another selector, or stand-ins in tests).
   * @default {denoSockets: loop.ts's Selector on Deno's own sockets}
   */
  sockets?: SocketsFactory;
  /** Where log lines go, instead of stdout and stderr in `logFormat`. */
  log?: Log;
  /** Called at each step of the loop, to watch it work (see trace.ts). */
  trace?: (event: AnyTraceEvent) => void;
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
  readonly addr: Deno.Addr;
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

/** What {@linkcode serve} does when an option is not given; main.ts's flags share them. */
export const DEFAULTS: Required<Omit<ServeOptions, "trace" | "log" | "sockets">> = {
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
  fairness: true,
};

/**
 * A selector and the sockets it can watch: loop.ts's Selector watches Deno's
 * own. The server makes its listener and datagram socket here, so that a
 * selector with sockets of its own kind slots in without touching the engines.
 */
export interface Sockets {
  /** The selector. */
  readonly selector: BaseSelector;
  /** Listens on TCP (`hostname`, `port`) or on a Unix socket (`path`). */
  listen(
    options: { hostname: string; port: number; reusePort: boolean } | { path: string },
  ): ListenerResource;
  /** Binds a UDP socket. */
  listenDatagram(hostname: string, port: number): DatagramResource;
}

/** Makes a selector and its sockets for a server: with this trace function, and fairness or not. */
export type SocketsFactory = (
  options: { trace?: (event: AnyTraceEvent) => void; fairness: boolean },
) => Sockets;

/**
 * loop.ts's Selector on Deno's own sockets, with the fairness plug-in if asked:
 * the {@linkcode SocketsFactory} that serve() uses unless told otherwise.
 *
 * @param options The trace function, and whether to attach fairness.ts.
 * @returns The selector, and how to make the sockets it watches.
 */
export function denoSockets(options: Parameters<SocketsFactory>[0]): Sockets {
  const { trace, fairness } = options;
  return {
    selector: new Selector({ trace, readGate: fairness ? new Fairness({ trace }) : undefined }),
    listen(where) {
      if ("path" in where) return Deno.listen({ transport: "unix", path: where.path });
      const { hostname, port, reusePort } = where;
      return Deno.listen({ hostname, port, ...(reusePort ? { reusePort } : {}) });
    },
    listenDatagram(hostname, port) {
      return Deno.listenDatagram({ transport: "udp", hostname, port });
    },
  };
}

/**
 * epoll.ts's selector on sockets of its own making (Linux, `--allow-ffi`); it
 * needs no fairness plug-in: the kernel reports every ready socket.
 *
 * @param options The trace function.
 * @returns The selector, and how to make the sockets it watches.
 */
export function epollSockets(options: Parameters<SocketsFactory>[0]): Sockets {
  const selector = new EpollSelector({ trace: options.trace });
  return {
    selector,
    listen(where) {
      return "path" in where ? selector.listenUnix(where.path) : selector.listen(where);
    },
    listenDatagram(hostname, port) {
      return selector.listenDatagram({ hostname, port });
    },
  };
}

/**
 * Metrics for OpenTelemetry, when Deno exports to a collector (`OTEL_DENO=true`;
 * Deno then exports the log lines too); undefined otherwise, and then nothing
 * is counted. Named and measured as the semantic conventions name Kestrel's
 * (`kestrel.active_connections`, `kestrel.connection.duration`), with their
 * attributes: `network.transport`, `network.type`, `server.address`, `server.port`.
 *
 * @param addr Where the server listens.
 */
function openTelemetry(addr: Deno.NetAddr | Deno.UnixAddr) {
  let meter;
  try {
    meter = Deno.telemetry.meterProvider.getMeter("echo");
  } catch {
    return undefined; // "otel not initialized": OTEL_DENO is not set
  }
  const server = "path" in addr ? { "network.transport": "unix", "server.address": addr.path } : {
    "network.transport": "tcp",
    "network.type": addr.hostname.includes(":") ? "ipv6" : "ipv4",
    "server.address": addr.hostname,
    "server.port": addr.port,
  };
  const udp = { ...server, "network.transport": "udp" };
  const sent = { "network.io.direction": "transmit" };
  const connection = "{connection}";
  const accepted = meter.createCounter("echo.server.accepted_connections", {
    description: "Connections accepted",
    unit: connection,
  });
  const active = meter.createUpDownCounter("echo.server.active_connections", {
    description: "Connections open now",
    unit: connection,
  });
  const duration = meter.createHistogram("echo.server.connection.duration", {
    description: "How long connections stayed open",
    unit: "s",
  });
  const io = meter.createCounter("echo.server.io", { description: "Bytes echoed", unit: "By" });
  const datagrams = meter.createCounter("echo.server.datagrams", {
    description: "UDP datagrams echoed",
    unit: "{datagram}",
  });
  return {
    connected() {
      accepted.add(1, server);
      active.add(1, server);
    },
    echoed(bytes: number) {
      io.add(bytes, { ...server, ...sent });
    },
    closed(durationMs: number) {
      active.add(-1, server);
      duration.record(durationMs / 1000, server);
    },
    datagram(bytes: number) {
      datagrams.add(1, udp);
      io.add(bytes, { ...udp, ...sent });
    },
  };
}

/** The name of a connection's peer, for log lines; a Unix socket's peers have none, so a number. */
function peerOf(conn: ServedConn): string {
  const { remoteAddr, localAddr } = conn.resource as ConnResource;
  return remoteAddr.transport === "unix"
    ? `${formatAddr(localAddr)}#${conn.data.id}`
    : formatAddr(remoteAddr);
}

/** The server's side of the work, for its engine (see engine.ts): every step counted and logged. */
class Service implements EchoServer {
  readonly selector: BaseSelector;
  readonly listener: ListenerResource;
  readonly log: Log;
  readonly trace: ((event: AnyTraceEvent) => void) | undefined;
  shuttingDown = false;
  /** The options, each given or defaulted. */
  readonly #options: typeof DEFAULTS;
  /** The engine that moves the bytes, in the chosen style. */
  readonly #engine: Engine;
  /** The connections served now. */
  readonly #conns = new Set<ServedConn>();
  /** The UDP socket, with `udp`, until it is closed. */
  readonly #datagrams: DatagramResource | undefined;
  #udpOpen: boolean;
  readonly #guard: ReplyGuard;
  readonly #metrics: ReturnType<typeof openTelemetry>;
  /** The Unix socket file's inode, to remove the file at shutdown only if it is still ours. */
  readonly #socketFile: number | null = null;
  /** Settles when the engine's run() ends. */
  readonly #stopped = Promise.withResolvers<void>();
  /** Per message: log it (`verbose`); keep the time of the last read (an idle timeout is set). */
  readonly #verbose: boolean;
  readonly #idleTimeout: number;
  #outOfDescriptors = false;
  /** stats.dropped when the last line about drops was printed. */
  #droppedLogged = 0;
  #idleTimer: ReturnType<typeof setInterval> | undefined = undefined;
  #dropsTimer: ReturnType<typeof setInterval> | undefined = undefined;
  readonly stats: ServerStats;

  constructor(options: typeof DEFAULTS, given: ServeOptions) {
    this.#options = options;
    this.#verbose = options.logLevel === "verbose";
    this.#idleTimeout = options.idleTimeout;
    const { unixPath, hostname, port, reusePort, udp, udpRate, style } = options;
    if (style === "blocking" && udp) {
      throw new TypeError("style blocking waits on one connection at a time: not with udp");
    }
    this.trace = given.trace;
    this.log = given.log ?? logTo(options.logFormat);
    const makeSockets = given.sockets ?? denoSockets;
    const sockets = makeSockets({ trace: this.trace, fairness: options.fairness });
    this.selector = sockets.selector;
    this.listener = sockets.listen(unixPath ? { path: unixPath } : { hostname, port, reusePort });
    try {
      // UDP on the port TCP got (port 0 picks one for both).
      const udpPort = (this.listener.addr as Deno.NetAddr).port;
      if (udp) this.#datagrams = sockets.listenDatagram(hostname, udpPort);
    } catch (error) {
      this.listener.close();
      throw error;
    }
    this.#udpOpen = this.#datagrams !== undefined;
    this.#metrics = openTelemetry(this.listener.addr as Deno.NetAddr | Deno.UnixAddr); // TCP or Unix
    if (unixPath) this.#socketFile = Deno.lstatSync(unixPath).ino;
    this.#guard = new ReplyGuard({ rate: udpRate });
    this.stats = this.#makeStats();
    this.#engine = style === "callbacks"
      ? callbacks(this)
      : coroutines(this, { oneAtATime: style === "blocking" });
  }

  get #logs(): boolean {
    return this.#options.logLevel !== "quiet";
  }

  #makeStats(): ServerStats {
    const conns = this.#conns;
    return {
      get open() {
        return conns.size;
      },
      accepted: 0,
      bytes: 0,
      get queued() {
        let queued = 0;
        for (const conn of conns) queued += conn.queued;
        return queued;
      },
      datagrams: 0,
      dropped: 0,
      peak: 0,
      failed: 0,
      started: performance.now(),
    };
  }

  /** Starts serving; returns what serve() hands its caller. */
  start(): Server {
    const { idleTimeout } = this.#options;
    if (idleTimeout > 0) {
      this.#idleTimer = setInterval(() => this.#closeIdle(), Math.min(1000, idleTimeout / 2));
    }
    if (this.#datagrams) {
      this.#dropsTimer = setInterval(() => this.#logDrops(), 1000);
      this.#engine.serveDatagrams(this.#datagrams);
    }
    this.#engine.run().finally(() => {
      clearInterval(this.#idleTimer);
      clearInterval(this.#dropsTimer);
      if (!this.shuttingDown) {
        this.#closeListener();
        if (this.#udpOpen) this.#datagrams?.close();
      }
    }).then(this.#stopped.resolve, this.#stopped.reject);
    return {
      addr: this.listener.addr,
      stats: this.stats,
      close: () => this.shutdown(),
      finished: this.#stopped.promise,
    };
  }

  welcome(conn: ConnResource): ConnInfo {
    if (this.#outOfDescriptors) {
      this.#outOfDescriptors = false;
      this.log.error("accepting again");
    }
    // Deno leaves Nagle on: small echoes would wait ~40 ms. (Unix sockets have no Nagle.)
    if (conn.remoteAddr.transport === "tcp") conn.setNoDelay?.(true);
    const now = performance.now();
    const info = {
      id: ++this.stats.accepted,
      bytes: 0,
      lastRead: this.#options.idleTimeout && now,
      opened: now,
    };
    if (this.#logs) {
      const peer = peerOf({ resource: conn, queued: 0, data: info });
      this.log.info(`${peer} connected`, { event: "connected", peer });
    }
    this.#metrics?.connected();
    return info;
  }

  opened(conn: ServedConn): void {
    const conns = this.#conns;
    conns.add(conn);
    this.stats.peak = Math.max(this.stats.peak, conns.size);
    const { maxConns } = this.#options;
    if (conns.size >= maxConns) {
      this.#engine.accepting(false); // the kernel's backlog holds newcomers
      if (this.#logs) {
        this.log.info(`${maxConns} connections open: new ones wait until one closes`, {
          event: "full",
          open: conns.size,
        });
      }
    }
  }

  acceptFailed(error: unknown): void {
    if (!/too many open files/i.test(String(error))) {
      return this.log.error(`accept failed: ${describeError(error)}`);
    }
    if (this.#outOfDescriptors) return; // said once; the selector backs off before the next accept
    this.#outOfDescriptors = true;
    this.log.error(
      "out of file descriptors: pausing accepts until connections close (raise `ulimit -n` or lower --max-conns)",
    );
  }

  received(conn: ServedConn, data: Uint8Array): void {
    if (this.#verbose) {
      const peer = peerOf(conn);
      this.log.info(`${peer} echoing ${data.length} bytes`, {
        event: "echo",
        peer,
        bytes: data.length,
      });
    }
    conn.data.bytes += data.length;
    this.stats.bytes += data.length;
    this.#metrics?.echoed(data.length);
    if (this.#idleTimeout) conn.data.lastRead = this.selector.now;
  }

  close(conn: ServedConn, error?: unknown): void {
    if (!this.#conns.delete(conn)) return; // closed already
    this.#engine.closeNow(conn);
    const durationMs = performance.now() - conn.data.opened;
    this.#metrics?.closed(durationMs);
    if (error) this.stats.failed++;
    if (this.#logs) {
      const { bytes } = conn.data;
      const peer = peerOf(conn);
      const why = error ? describeError(error) : undefined;
      this.log.info(
        why
          ? `${peer} closed after ${bytes} bytes: ${why}`
          : `${peer} closed, ${bytes} bytes echoed`,
        { event: "closed", peer, bytes, durationMs: Math.round(durationMs), error: why },
      );
    }
    if (this.shuttingDown) this.#stopWhenDone();
    else if (this.#conns.size === this.#options.maxConns - 1) this.#engine.accepting(true);
  }

  /** Whether to echo a datagram; drops are summed up in one log line a second at most. */
  answer(datagram: Uint8Array, from: Deno.Addr): boolean {
    if (this.#guard.check(from, this.selector.now) !== "reply") {
      this.stats.dropped++;
      return false;
    }
    if (this.#verbose) {
      const peer = formatAddr(from);
      this.log.info(`udp ${peer} echoing ${datagram.length} bytes`, {
        event: "echo",
        transport: "udp",
        peer,
        bytes: datagram.length,
      });
    }
    this.stats.datagrams++;
    this.#metrics?.datagram(datagram.length);
    return true;
  }

  datagramsClosed(): void {
    this.#udpOpen = false;
    this.#logDrops();
    if (this.shuttingDown) this.#stopWhenDone();
  }

  /**
   * Graceful shutdown: writes back what was read, then half-closes and waits
   * for the peer's EOF (closing with unread input would send a reset, which
   * can destroy echoed bytes still in flight); input that arrives now is dropped.
   */
  shutdown(): Promise<void> {
    const stopped = this.#stopped.promise;
    if (this.shuttingDown) return stopped;
    this.shuttingDown = true;
    clearInterval(this.#idleTimer);
    clearInterval(this.#dropsTimer);
    this.#engine.stopAccepting();
    this.#closeListener();
    if (this.#datagrams) this.#engine.closeDatagrams(this.#datagrams);
    this.#stopWhenDone();
    for (const conn of this.#conns) this.#engine.shutdown(conn);
    const graceTimer = setTimeout(() => {
      for (const conn of this.#conns) this.close(conn, new Error("grace period over"));
    }, this.#options.gracePeriod);
    const stopTimer = () => clearTimeout(graceTimer);
    stopped.then(stopTimer, stopTimer);
    return stopped;
  }

  /** At shutdown: ends the engine's run() once the last connection and the UDP socket are closed. */
  #stopWhenDone(): void {
    if (this.#conns.size === 0 && !this.#udpOpen) this.#engine.stop();
  }

  /** Closes the listener, and removes a Unix socket's file, which Deno leaves behind. */
  #closeListener(): void {
    try {
      this.listener.close();
    } catch {
      // closed already (async_loop.ts's abort() closes what it unregisters)
    }
    const path = this.#options.unixPath;
    try {
      if (this.#socketFile !== null && Deno.lstatSync(path).ino === this.#socketFile) {
        Deno.removeSync(path); // still ours: nobody replaced it meanwhile
      }
    } catch {
      // gone already
    }
  }

  #closeIdle(): void {
    const now = performance.now();
    const { idleTimeout } = this.#options;
    for (const conn of this.#conns) {
      if (now - conn.data.lastRead > idleTimeout) {
        this.close(conn, new Error(`idle for over ${idleTimeout / 1000} s`));
      }
    }
  }

  #logDrops(): void {
    const dropped = this.stats.dropped - this.#droppedLogged;
    if (dropped === 0) return;
    this.#droppedLogged = this.stats.dropped;
    if (this.#logs) {
      this.log.info(
        `udp: ${dropped} datagrams not answered (over ${this.#options.udpRate} replies/s from one address, or from a responder's port)`,
        { event: "dropped", transport: "udp", datagrams: dropped },
      );
    }
  }
}

/**
 * Starts an echo server.
 *
 * @example Usage
 * ```ts
 * import { serve } from "./server.ts";
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
 * @throws What listening throws: `Deno.errors.AddrInUse`, `NotCapable`...
 */
export function serve(options: ServeOptions = {}): Server {
  return new Service(withDefaults(options, DEFAULTS), options).start();
}
