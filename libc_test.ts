// Socket addresses in and out of C structs, as Deno writes them.
import { assert, assertEquals } from "@std/assert";
import { AF_INET, inetAddr, Libc, readAddr, SOCK_DGRAM, unixAddr } from "./libc.ts";

/** An address written to a C struct and read back, as Deno would print it. */
function roundTrip(hostname: string): string | undefined {
  const addr = inetAddr(hostname, 8080);
  return addr && (readAddr(addr, "tcp") as Deno.NetAddr).hostname;
}

Deno.test("numeric addresses, IPv4 and IPv6 in every text form, come back as Deno writes them", () => {
  const cases: [string, string][] = [
    ["127.0.0.1", "127.0.0.1"],
    ["localhost", "127.0.0.1"],
    ["::1", "::1"],
    ["[::1]", "::1"],
    ["::", "::"],
    ["fe80::1", "fe80::1"],
    ["1:2:3:4:5:6:7:8", "1:2:3:4:5:6:7:8"],
    ["2001:DB8:0:0:1:0:0:1", "2001:db8::1:0:0:1"], // the first longest run of zeros goes
    ["2001:0:0:1::1", "2001:0:0:1::1"],
    ["::ffff:127.0.0.1", "::ffff:127.0.0.1"],
    ["64:ff9b::192.0.2.33", "64:ff9b::c000:221"],
  ];
  assertEquals(cases.map(([text]) => roundTrip(text)), cases.map(([, written]) => written));
  assertEquals(readAddr(inetAddr("::1", 80)!, "udp"), {
    transport: "udp",
    hostname: "::1",
    port: 80,
  });
});

Deno.test("what is not a numeric address is refused: names, short or long forms, bad groups", () => {
  const refused = [
    "example.com",
    "1.2.3",
    "256.1.1.1",
    "01.2.3.4",
    "1:2",
    "::1::",
    "1::2::3",
    "1:2:3:4:5:6:7:8:9",
    "1:2:3:4::5:6:7:8",
    "12345::",
    "::ffff:1.2.3",
    "",
  ];
  assertEquals(refused.map(roundTrip), refused.map(() => undefined));
});

Deno.test("a Unix socket's path fits in sockaddr_un, or is refused", () => {
  assertEquals(readAddr(unixAddr("/tmp/echo.sock")!, "tcp"), {
    transport: "unix",
    path: "/tmp/echo.sock",
  });
  assertEquals(unixAddr("/tmp/" + "x".repeat(103)), undefined); // 108 bytes
  assertEquals(unixAddr("/tmp/a\0b"), undefined);
  const unterminated = unixAddr("/x")!.subarray(0, 4); // no NUL after the path
  assertEquals(readAddr(unterminated, "tcp"), { transport: "unix", path: "/x" });
});

Deno.test("every call gives C the length of the array it passes, whatever sizes came before", () => {
  const libc = new Libc();
  const fd = libc.socket(AF_INET, SOCK_DGRAM); // datagrams keep their length: a wrong one shows
  try {
    assertEquals(libc.bind(fd, inetAddr("127.0.0.1", 0)!), 0);
    assert(libc.sockname(fd) > 0);
    const self = libc.addr.slice(0, 16);
    const receive = (into: Uint8Array) => {
      for (let tries = 0; tries < 1000; tries++) {
        const n = libc.recvfrom(fd, into);
        if (n >= 0) return n;
      }
      throw new Error("the datagram sent to itself did not arrive");
    };
    // Sizes that share a slot of the cache of sizes (5 and 13; 40, 8 and 64), in turns.
    for (const size of [5, 13, 5, 40, 8, 40, 64, 1]) {
      assertEquals(libc.sendto(fd, new Uint8Array(size).fill(size), self), size);
      const into = new Uint8Array(64);
      assertEquals(receive(into), size);
      assertEquals(into.subarray(0, size), new Uint8Array(size).fill(size));
    }
    assertEquals(libc.sendto(fd, new Uint8Array(40), self), 40);
    assertEquals(receive(new Uint8Array(8)), 8); // no more than the array holds
  } finally {
    libc.close(fd);
    libc.unload();
  }
});
