/**
 * Whom a UDP echo server may answer. UDP has no handshake, so a datagram's
 * source address is whatever the sender wrote in it: an attacker can send us
 * datagrams "from" a victim and make us flood the victim with replies
 * (reflection), or "from" another echo or chargen service and start two
 * servers answering each other forever (CVE-1999-0103). An echo reply is never
 * larger than its request, so there is no amplification in size; what is left
 * to bound is how many replies go where:
 *
 * - replies per source address (the host, whatever its port) are capped by a
 *   token bucket, so a spoofed flood reaches its victim at most at that rate;
 * - datagrams from the ports of well-known UDP responders are dropped, so that
 *   no reply can start a loop with one of them.
 *
 * The table of buckets is bounded: past `maxSources` addresses, the first one
 * seen is forgotten. That can give it a fresh burst, no more: to evict one
 * address a flood must bring `maxSources` new ones, each held to the rate.
 *
 * @module
 */

/** Source ports of UDP services that answer whatever reaches them: replying to one could loop. */
export const REFLECTOR_PORTS: ReadonlyMap<number, string> = new Map([
  [0, "no valid sender has port 0"],
  [7, "echo: two echo servers would answer each other forever"],
  [13, "daytime"],
  [17, "quote of the day"],
  [19, "chargen: the classic echo/chargen loop"],
  [37, "time"],
  [53, "DNS"],
  [69, "TFTP"],
  [111, "portmapper"],
  [123, "NTP"],
  [137, "NetBIOS name service"],
  [161, "SNMP"],
  [389, "CLDAP"],
  [520, "RIP"],
  [1900, "SSDP"],
  [5353, "mDNS"],
  [11211, "memcached"],
]);

/** Options for {@linkcode ReplyGuard}. */
export interface ReplyGuardOptions {
  /** Replies per second to one source address; also its burst. */
  rate: number;
  /** Source addresses remembered at most. @default {10000} */
  maxSources?: number;
}

/** Why a datagram is answered, or not. */
export type Verdict = "reply" | "reflector" | "rate";

/** One source address's budget of replies. */
interface Bucket {
  /** Replies it may get now. */
  tokens: number;
  /** performance.now() when `tokens` was last brought up to date. */
  at: number;
}

/**
 * Decides, datagram by datagram, whether to answer its sender.
 *
 * @example Usage
 * ```ts
 * import { ReplyGuard } from "./udp_guard.ts";
 * import { assertEquals } from "@std/assert";
 *
 * const guard = new ReplyGuard({ rate: 2 });
 * const from = { transport: "udp", hostname: "127.0.0.1", port: 5000 } as const;
 * assertEquals([guard.check(from), guard.check(from), guard.check(from)], ["reply", "reply", "rate"]);
 * assertEquals(guard.check({ ...from, port: 19 }), "reflector");
 * ```
 */
export class ReplyGuard {
  /** Replies per second per source, and the burst. */
  readonly rate: number;
  /** Source addresses remembered at most. */
  readonly maxSources: number;
  /** The buckets by source host, first seen first (a Map keeps insertion order). */
  readonly #buckets = new Map<string, Bucket>();

  /**
   * Creates a guard.
   *
   * @param options The rate per source, and how many sources to remember.
   */
  constructor(options: ReplyGuardOptions) {
    this.rate = options.rate;
    this.maxSources = options.maxSources ?? 10_000;
  }

  /** How many source addresses are remembered now. */
  get sources(): number {
    return this.#buckets.size;
  }

  /**
   * Whether to answer a datagram from `from`; a reply counts against its source.
   *
   * @param from The datagram's source address.
   * @param now performance.now(), given by the caller who has it.
   * @returns "reply", or why not: "reflector" (a responder's port) or "rate" (over the cap).
   */
  check(from: Deno.Addr, now: number = performance.now()): Verdict {
    if (from.transport !== "udp" || REFLECTOR_PORTS.has(from.port)) return "reflector";
    const host = from.hostname;
    let bucket = this.#buckets.get(host);
    if (bucket) {
      bucket.tokens = Math.min(this.rate, bucket.tokens + (now - bucket.at) * this.rate / 1000);
      bucket.at = now;
    } else {
      if (this.#buckets.size >= this.maxSources) {
        this.#buckets.delete(this.#buckets.keys().next().value!); // forget the first seen
      }
      bucket = { tokens: this.rate, at: now };
      this.#buckets.set(host, bucket);
    }
    if (bucket.tokens < 1) return "rate";
    bucket.tokens -= 1;
    return "reply";
  }
}
