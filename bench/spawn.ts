/**
 * A server the benchmark scripts start as a process of its own, on a free port
 * of 127.0.0.1, and stop with SIGKILL: `deno task bench` and `deno task lesson`.
 *
 * @module
 */

const root = new URL("../", import.meta.url).pathname;

/** The command that starts a server on a port. */
export type Command = (port: number) => [string, ...string[]];

/**
 * The command for main.ts with `flags`, quiet (`--allow-ffi` too for epoll).
 *
 * @param flags main.ts's flags, e.g. `--style async`.
 * @returns The command.
 */
export function mainTs(...flags: string[]): Command {
  const ffi = flags.includes("epoll") ? ["--allow-ffi"] : [];
  return (port) => [
    "deno",
    "run",
    "--allow-net=127.0.0.1",
    ...ffi,
    `${root}main.ts`,
    "--quiet",
    ...flags,
    "--port",
    `${port}`,
  ];
}

/** A server process on a free port. */
export class SpawnedServer {
  /** The port it listens on. */
  readonly port: number;
  readonly #child: Deno.ChildProcess;

  /**
   * Starts it; {@linkcode SpawnedServer.ready} says when it accepts.
   *
   * @param name Its name, for errors.
   * @param command What starts it.
   */
  constructor(readonly name: string, command: Command) {
    const probe = Deno.listen({ hostname: "127.0.0.1", port: 0 });
    this.port = probe.addr.port;
    probe.close();
    const [program, ...args] = command(this.port);
    this.#child = new Deno.Command(program, { args, stdin: "null", stdout: "null" }).spawn();
  }

  /** Its process id. */
  get pid(): number {
    return this.#child.pid;
  }

  /** Waits until the server accepts connections (10 s at most). */
  async ready(): Promise<void> {
    for (let i = 0; i < 200; i++) {
      try {
        (await Deno.connect({ hostname: "127.0.0.1", port: this.port })).close();
        return;
      } catch {
        await new Promise((resolve) => setTimeout(resolve, 50));
      }
    }
    throw new Error(`${this.name} did not start`);
  }

  /** Kills it, and waits until it is gone. */
  async stop(): Promise<void> {
    this.#child.kill("SIGKILL");
    await this.#child.status;
  }
}
