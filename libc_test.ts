// Socket addresses in and out of C structs, as Deno writes them.
import { assertEquals } from "@std/assert";
import { inetAddr, readAddr, unixAddr } from "./libc.ts";

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
