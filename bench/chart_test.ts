import { assert, assertEquals } from "@std/assert";
import { chart } from "./chart.ts";

Deno.test("chart: one bar per server and scenario, the best of each scenario full length", () => {
  const svg = chart(["a", "b <&>"], [
    {
      scenario: "rr 5 B x1",
      bars: [{ perSecond: 20_000, p99: 0.5 }, { perSecond: 10_000, p99: 1 }],
    },
    { scenario: "rr 4 KiB x20", bars: [{ perSecond: 100, p99: 40 }, { perSecond: 300, p99: 20 }] },
  ], "title & more");
  assert(svg.startsWith("<svg ") && svg.trimEnd().endsWith("</svg>"));
  assert(svg.includes(">b &lt;&amp;&gt;</text>") && svg.includes(">title &amp; more</text>"));
  const widths = [...svg.matchAll(/<rect x="\d+" y="\d+" width="(\d+\.\d)" height="10"/g)]
    .map((match) => Number(match[1]));
  // Per panel, per scenario: [a, b]. Each scenario on its own scale.
  assertEquals(widths, [270, 135, 90, 270, 135, 270, 270, 135]);
  assert(svg.includes(">20k</text>") && svg.includes(">0.50</text>"));
});
