/**
 * The performance story as one picture: for each scenario of `deno task
 * bench`, round trips per second and p99 latency of each server, as grouped
 * horizontal bars, each scenario on its own scale. Hand-written SVG, no dependency.
 *
 * @module
 */

/** One server's figures in one scenario. */
export interface Bar {
  /** Round trips per second. */
  perSecond: number;
  /** 99th percentile latency in milliseconds. */
  p99: number;
}

/** The figures of one scenario, one bar per server (in the order of `servers`). */
export interface Row {
  /** The scenario, e.g. "rr 5 B x20". */
  scenario: string;
  /** One per server. */
  bars: Bar[];
}

/** Baseline grey, then blue and orange (the deno selector), green and purple (epoll). */
const COLORS = ["#9aa0a6", "#1a73e8", "#e8710a", "#188038", "#9334e6"];
const LABEL_WIDTH = 120;
const PANEL_WIDTH = 330;
const GAP = 40;
const BAR_HEIGHT = 12;
const ROW_GAP = 14;
const TOP = 56;

/**
 * Draws the chart.
 *
 * @param servers The servers' names, for the legend.
 * @param rows One row per scenario.
 * @param title A line above the chart (machine, Deno version, runs).
 * @returns The SVG document.
 */
export function chart(servers: string[], rows: Row[], title: string): string {
  const rowHeight = servers.length * BAR_HEIGHT + ROW_GAP;
  const height = TOP + rows.length * rowHeight + 30;
  const width = LABEL_WIDTH + 2 * PANEL_WIDTH + GAP + 20;
  const parts: string[] = [];
  const text = (x: number, y: number, content: string, attrs = "") =>
    parts.push(`<text x="${x}" y="${y}" ${attrs}>${escape(content)}</text>`);

  text(10, 18, title, 'font-size="13" font-weight="bold"');
  text(width - 10, 37, "bars scaled per scenario", 'text-anchor="end" fill="#5f6368"');
  servers.forEach((name, i) => {
    const x = 10 + i * 150;
    parts.push(
      `<rect x="${x}" y="28" width="10" height="10" fill="${COLORS[i % COLORS.length]}"/>`,
    );
    text(x + 14, 37, name);
  });
  const panels = [
    { title: "round trips per second (more is better)", value: (bar: Bar) => bar.perSecond },
    { title: "p99 latency in ms (less is better)", value: (bar: Bar) => bar.p99 },
  ];
  panels.forEach((panel, p) => {
    const left = LABEL_WIDTH + p * (PANEL_WIDTH + GAP);
    text(left, TOP - 4, panel.title, 'font-weight="bold"');
    rows.forEach((row, r) => {
      const top = TOP + r * rowHeight;
      // Each scenario has its own scale: they differ a thousandfold, the servers within one do not.
      const max = Math.max(...row.bars.map(panel.value), 1e-9);
      if (p === 0) text(10, top + rowHeight / 2, row.scenario);
      row.bars.forEach((bar, b) => {
        const value = panel.value(bar);
        const length = Math.max(1, (value / max) * (PANEL_WIDTH - 60));
        const y = top + b * BAR_HEIGHT;
        parts.push(
          `<rect x="${left}" y="${y}" width="${length.toFixed(1)}" height="${
            BAR_HEIGHT - 2
          }" fill="${COLORS[b % COLORS.length]}"/>`,
        );
        text(left + length + 4, y + BAR_HEIGHT - 3, format(value), 'font-size="10"');
      });
    });
  });
  text(
    10,
    height - 10,
    "rr SIZE xN: N connections, each sending a SIZE message and waiting for its whole echo",
    'fill="#5f6368"',
  );
  return [
    `<svg xmlns="http://www.w3.org/2000/svg" width="${width}" height="${height}" ` +
    `viewBox="0 0 ${width} ${height}" font-family="sans-serif" font-size="11" fill="#202124">`,
    `<rect width="${width}" height="${height}" fill="white"/>`,
    ...parts,
    "</svg>",
    "",
  ].join("\n");
}

/** A figure short enough for a bar's end: 129k, 1.2, 0.05. */
function format(value: number): string {
  if (value >= 10_000) return `${Math.round(value / 1000)}k`;
  if (value >= 100) return `${Math.round(value)}`;
  return value >= 1 ? value.toFixed(1) : value.toFixed(2);
}

function escape(content: string): string {
  return content.replaceAll("&", "&amp;").replaceAll("<", "&lt;").replaceAll(">", "&gt;");
}
