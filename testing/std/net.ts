/**
 * Stand-in for the part of `@std/net` the tests use, for machines that cannot
 * reach JSR (see testing/run_tests.ts). Written for this project; the real
 * package is used wherever it can be fetched.
 *
 * @module
 */

/** Options for {@linkcode getAvailablePort}, as in `@std/net`. */
export interface GetAvailablePortOptions {
  /** A port to try first. */
  preferredPort?: number;
}

/**
 * A port that nothing listens on right now, as `@std/net`'s function of that
 * name: it binds the same address (all interfaces), so it needs the same
 * permission.
 *
 * @param options A port to try first.
 * @returns The port.
 */
export function getAvailablePort(options: GetAvailablePortOptions = {}): number {
  if (options.preferredPort) {
    try {
      return listenOnce(options.preferredPort);
    } catch (error) {
      if (!(error instanceof Deno.errors.AddrInUse)) throw error;
    }
  }
  return listenOnce(0);
}

function listenOnce(port: number): number {
  const listener = Deno.listen({ port });
  listener.close();
  return listener.addr.port;
}
