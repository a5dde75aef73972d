//! Charts the benchmarks write (PNG): grouped bars and lines.

use std::path::Path;

use anyhow::Context;
use plotters::prelude::*;

fn drawing(e: impl std::fmt::Display) -> anyhow::Error {
    anyhow::anyhow!("{e}")
}

/// Bars: for each group (e.g. a link setting), one bar per series (e.g. a
/// configuration), its height the value; missing values are left out.
///
/// # Errors
/// The file cannot be written.
pub fn bars(path: &Path, title: &str, y: &str, groups: &[String], series: &[(String, Vec<Option<f64>>)]) -> anyhow::Result<()> {
    let root = BitMapBackend::new(path, (1000, 460)).into_drawing_area();
    root.fill(&WHITE).map_err(drawing)?;
    let ymax = series.iter().flat_map(|(_, v)| v.iter().flatten()).copied().fold(0.0, f64::max).max(1e-9) * 1.4;
    let per = series.len() + 1;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(30)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..(groups.len().max(1) * per) as f64, 0.0..ymax)
        .map_err(drawing)?;
    chart.configure_mesh().disable_x_mesh().x_labels(0).y_desc(y).draw().map_err(drawing)?;
    for (si, (name, values)) in series.iter().enumerate() {
        let color = Palette99::pick(si).to_rgba();
        let rects: Vec<_> = values
            .iter()
            .enumerate()
            .filter_map(|(gi, v)| {
                let x = (gi * per + si) as f64;
                v.map(|v| Rectangle::new([(x, 0.0), (x + 0.9, v)], color.filled()))
            })
            .collect();
        chart
            .draw_series(rects)
            .map_err(drawing)?
            .label(name.as_str())
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 10, y + 5)], color.filled()));
    }
    for (gi, g) in groups.iter().enumerate() {
        chart.draw_series(std::iter::once(Text::new(g.clone(), ((gi * per) as f64, ymax * 0.97), ("sans-serif", 14)))).map_err(drawing)?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperRight)
        .draw()
        .map_err(drawing)?;
    root.present().map_err(drawing).with_context(|| format!("writing {}", path.display()))
}

/// Lines (points joined), one per series; `log_x` spaces x by its log.
///
/// # Errors
/// The file cannot be written.
pub fn lines(path: &Path, title: &str, x: &str, y: &str, series: &[(String, Vec<(f64, f64)>)], log_x: bool) -> anyhow::Result<()> {
    let root = BitMapBackend::new(path, (1000, 460)).into_drawing_area();
    root.fill(&WHITE).map_err(drawing)?;
    let pts = || series.iter().flat_map(|(_, v)| v.iter());
    let xmax = pts().map(|p| p.0).fold(1.0, f64::max);
    let xmin = pts().map(|p| p.0).fold(f64::INFINITY, f64::min).min(xmax);
    let ymax = pts().map(|p| p.1).fold(0.0, f64::max).max(1e-9) * 1.15;
    let f = |v: f64| if log_x { v.max(1e-9).log10() } else { v };
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(if log_x { f(xmin)..f(xmax) + 0.05 } else { 0.0..xmax * 1.05 }, 0.0..ymax)
        .map_err(drawing)?;
    let label = move |v: &f64| if log_x { format!("{:.0}", 10f64.powf(*v)) } else { format!("{v:.0}") };
    chart.configure_mesh().x_desc(x).y_desc(y).x_label_formatter(&label).draw().map_err(drawing)?;
    for (si, (name, points)) in series.iter().enumerate() {
        let color = Palette99::pick(si).to_rgba();
        let line: Vec<(f64, f64)> = points.iter().map(|p| (f(p.0), p.1)).collect();
        chart
            .draw_series(LineSeries::new(line.clone(), color.stroke_width(2)).point_size(3))
            .map_err(drawing)?
            .label(name.as_str())
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 16, y)], color.stroke_width(2)));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperLeft)
        .draw()
        .map_err(drawing)?;
    root.present().map_err(drawing).with_context(|| format!("writing {}", path.display()))
}
