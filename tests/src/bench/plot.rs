//! The throughput plot of docs/BENCHMARKS.md: horizontal bar charts written as SVG by hand
//! (no plotting dependency), one panel per figure, the splitter's bars highlighted.

use super::{group, Figures};

const WIDTH: f64 = 900.0;
const LABEL_W: f64 = 230.0;
const BAR_H: f64 = 22.0;
const GAP: f64 = 8.0;

struct Bar {
    label: String,
    value: f64,
    text: String,
    highlight: bool,
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

fn panel(out: &mut String, y0: f64, title: &str, bars: &[Bar]) -> f64 {
    let max = bars.iter().map(|b| b.value).fold(0.0f64, f64::max).max(1e-9);
    let plot_w = WIDTH - LABEL_W - 130.0;
    out.push_str(&format!("<text x=\"10\" y=\"{:.1}\" font-size=\"15\" font-weight=\"bold\">{}</text>\n", y0 + 18.0, escape(title)));
    let mut y = y0 + 30.0;
    for b in bars {
        let w = (b.value / max * plot_w).max(1.0);
        let fill = if b.highlight { "#d9480f" } else { "#868e96" };
        out.push_str(&format!(
            "<text x=\"{:.1}\" y=\"{:.1}\" font-size=\"13\" text-anchor=\"end\">{}</text>\n\
             <rect x=\"{LABEL_W}\" y=\"{y:.1}\" width=\"{w:.1}\" height=\"{BAR_H}\" fill=\"{fill}\"/>\n\
             <text x=\"{:.1}\" y=\"{:.1}\" font-size=\"13\">{}</text>\n",
            LABEL_W - 8.0,
            y + BAR_H * 0.72,
            escape(&b.label),
            LABEL_W + w + 6.0,
            y + BAR_H * 0.72,
            escape(&b.text)
        ));
        y += BAR_H + GAP;
    }
    y + 10.0
}

/// The SVG, or None when no throughput section ran.
pub fn svg(figures: &Figures, subtitle: &str) -> Option<String> {
    if figures.forward.is_none() && figures.connect.is_none() && figures.connect_xdp.is_none() {
        return None;
    }
    let mut body = String::new();
    let mut y = 40.0;
    if let Some(f) = &figures.forward {
        let bars: Vec<Bar> = f
            .rows
            .iter()
            .map(|r| Bar {
                label: r.system.short().into(),
                value: r.pps,
                text: format!("{} pps", group(r.pps)),
                highlight: r.system.short().starts_with("splitter"),
            })
            .collect();
        y = panel(&mut body, y, "64-byte UDP forwarded, packets/s (generator and path share CPU 0)", &bars);
        let bars: Vec<Bar> = f
            .rows
            .iter()
            .filter(|r| !r.system.is_floor())
            .map(|r| Bar {
                label: r.system.short().into(),
                value: r.marginal_us.max(0.0),
                text: format!("{:.3} µs", r.marginal_us),
                highlight: r.system.short().starts_with("splitter"),
            })
            .collect();
        y = panel(&mut body, y, "CPU per forwarded packet above the XDP_DROP floor, µs (lower is better)", &bars);
    }
    if let Some(c) = &figures.connect {
        let bars = connection_bars(c.rows.iter().map(|r| (r.system, r.loaded.rate())));
        y = panel(&mut body, y, "Short TCP connections/s, kernel-socket clients and backends (they cap every balancer)", &bars);
    }
    if let Some(c) = &figures.connect_xdp {
        let bars = connection_bars(c.rows.iter().map(|r| (r.system, r.rate())));
        y = panel(&mut body, y, "Short TCP connections/s between XDP endpoints (the balancer's own limit)", &bars);
    }
    Some(format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{WIDTH}\" height=\"{:.0}\" viewBox=\"0 0 {WIDTH} {:.0}\" \
         font-family=\"sans-serif\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"10\" y=\"22\" font-size=\"17\" font-weight=\"bold\">splitter vs the alternatives</text>\n\
         <text x=\"{:.0}\" y=\"22\" font-size=\"12\" text-anchor=\"end\" fill=\"#495057\">{}</text>\n{body}</svg>\n",
        y + 10.0,
        y + 10.0,
        WIDTH - 10.0,
        escape(subtitle)
    ))
}

/// One bar per system of a connection section: its connections per second.
fn connection_bars(rows: impl Iterator<Item = (super::connect::System, f64)>) -> Vec<Bar> {
    rows.map(|(system, rate)| Bar {
        label: system.short().into(),
        value: rate,
        text: format!("{}/s", group(rate)),
        highlight: system.short().starts_with("splitter"),
    })
    .collect()
}
