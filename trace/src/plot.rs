//! PNG and SVG plots of a trace (feature `plot`).

use std::path::{Path, PathBuf};

use plotters::coord::Shift;
use plotters::prelude::*;

use crate::analysis::{Analysis, cumulative_unique};
use crate::file::Trace;

/// Errors drawing plots.
#[derive(Debug, thiserror::Error)]
#[error("cannot draw {file}: {why}")]
pub struct PlotError {
    /// The file being drawn.
    pub file: PathBuf,
    /// The drawing backend's message.
    pub why: String,
}

const MIB: f64 = 1024.0 * 1024.0;

type Area<'a, B> = DrawingArea<B, Shift>;

fn histogram<B: DrawingBackend>(area: &Area<'_, B>, a: &Analysis, label: &str) -> Result<(), String> {
    area.fill(&WHITE).map_err(|e| e.to_string())?;
    let labels: Vec<String> = a.histogram.iter().map(|b| human(b.min)).collect();
    let max = a.histogram.iter().map(|b| b.count).max().unwrap_or(1);
    let n = a.histogram.len().max(1);
    let mut chart = ChartBuilder::on(area)
        .caption(format!("{label}Read request sizes"), ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d((0..n).into_segmented(), 0..max + max / 10 + 1)
        .map_err(|e| e.to_string())?;
    chart
        .configure_mesh()
        .x_desc("request size (power-of-two bucket, lower bound)")
        .y_desc("requests")
        .x_label_formatter(&|v| match v {
            SegmentValue::CenterOf(i) => labels.get(*i).cloned().unwrap_or_default(),
            _ => String::new(),
        })
        .draw()
        .map_err(|e| e.to_string())?;
    chart
        .draw_series(
            Histogram::vertical(&chart).style(BLUE.filled()).margin(4).data(a.histogram.iter().enumerate().map(|(i, b)| (i, b.count))),
        )
        .map_err(|e| e.to_string())?;
    area.present().map_err(|e| e.to_string())
}

/// How the points of a time plot are drawn.
enum Mark {
    Dots,
    Line,
}

/// A plot of `pts` (seconds, MiB) with time on the x axis.
fn time_plot<B: DrawingBackend>(area: &Area<'_, B>, title: &str, y_desc: &str, pts: Vec<(f64, f64)>, mark: Mark) -> Result<(), String> {
    area.fill(&WHITE).map_err(|e| e.to_string())?;
    let tmax = pts.iter().map(|p| p.0).fold(0.0, f64::max) * 1.02 + 1e-3;
    let ymax = pts.iter().map(|p| p.1).fold(0.0, f64::max) * 1.05 + 1e-3;
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(0.0..tmax, 0.0..ymax)
        .map_err(|e| e.to_string())?;
    chart.configure_mesh().x_desc("time since start (s)").y_desc(y_desc).draw().map_err(|e| e.to_string())?;
    match mark {
        Mark::Dots => chart.draw_series(pts.iter().map(|&p| Circle::new(p, 2, BLUE.filled()))).map(|_| ()),
        Mark::Line => chart.draw_series(LineSeries::new(pts, BLUE.stroke_width(2))).map(|_| ()),
    }
    .map_err(|e| e.to_string())?;
    area.present().map_err(|e| e.to_string())
}

fn offsets<B: DrawingBackend>(area: &Area<'_, B>, t: &Trace, label: &str) -> Result<(), String> {
    let pts = t.records.iter().filter_map(|r| Some((r.t_ns as f64 / 1e9, r.boot_bytes()?.start as f64 / MIB))).collect();
    time_plot(area, &format!("{label}Read offset over time"), "offset (MiB)", pts, Mark::Dots)
}

fn cumulative<B: DrawingBackend>(area: &Area<'_, B>, t: &Trace, label: &str) -> Result<(), String> {
    let mut pts: Vec<(f64, f64)> = vec![(0.0, 0.0)];
    pts.extend(cumulative_unique(t).into_iter().map(|(ns, b)| (ns as f64 / 1e9, b as f64 / MIB)));
    time_plot(area, &format!("{label}Cumulative unique boot data"), "unique bytes read (MiB)", pts, Mark::Line)
}

fn human(b: u64) -> String {
    match b {
        b if b >= 1 << 20 => format!("{}M", b >> 20),
        b if b >= 1 << 10 => format!("{}K", b >> 10),
        b => format!("{b}"),
    }
}

/// Evaluates `$draw` (a `Result<(), String>` over `$area`, the drawing area
/// of either backend) into `$file`: PNG or SVG by its extension.
macro_rules! render_to {
    ($file:expr, $size:expr, |$area:ident| $draw:expr) => {{
        let file: &Path = $file;
        if file.extension().is_some_and(|e| e == "png") {
            let $area = BitMapBackend::new(file, $size).into_drawing_area();
            $draw
        } else {
            let $area = SVGBackend::new(file, $size).into_drawing_area();
            $draw
        }
    }};
}

/// Draws `sizes`, `offsets` and `cumulative`, each as PNG and SVG, into `dir`.
/// Returns the files written.
///
/// # Errors
/// The first plot that cannot be drawn or written.
pub fn plot_all(trace: &Trace, analysis: &Analysis, dir: &Path) -> Result<Vec<PathBuf>, PlotError> {
    std::fs::create_dir_all(dir).map_err(|e| PlotError { file: dir.to_path_buf(), why: e.to_string() })?;
    let mut written = Vec::new();
    for name in ["sizes", "offsets", "cumulative"] {
        for ext in ["png", "svg"] {
            let file = dir.join(format!("{name}.{ext}"));
            render_to!(&file, (900, 540), |area| match name {
                "sizes" => histogram(&area, analysis, ""),
                "offsets" => offsets(&area, trace, ""),
                _ => cumulative(&area, trace, ""),
            })
            .map_err(|why| PlotError { file: file.clone(), why })?;
            written.push(file);
        }
    }
    Ok(written)
}

/// Draws the three plots of each trace side by side, one row per trace, as
/// `compare.png` and `compare.svg` in `dir`. Returns the files written.
///
/// # Errors
/// A plot that cannot be drawn or written.
pub fn plot_compare(traces: &[(&str, &Trace, &Analysis)], dir: &Path) -> Result<Vec<PathBuf>, PlotError> {
    std::fs::create_dir_all(dir).map_err(|e| PlotError { file: dir.to_path_buf(), why: e.to_string() })?;
    let rows = traces.len().max(1);
    let size = (1800, u32::try_from(rows * 420).unwrap_or(u32::MAX));
    let mut written = Vec::new();
    for ext in ["png", "svg"] {
        let file = dir.join(format!("compare.{ext}"));
        render_to!(&file, size, |root| (|| {
            root.fill(&WHITE).map_err(|e| e.to_string())?;
            let cells = root.split_evenly((rows, 3));
            for (i, (name, trace, analysis)) in traces.iter().enumerate() {
                let label = format!("{name}: ");
                histogram(&cells[i * 3], analysis, &label)?;
                offsets(&cells[i * 3 + 1], trace, &label)?;
                cumulative(&cells[i * 3 + 2], trace, &label)?;
            }
            root.present().map_err(|e| e.to_string())
        })())
        .map_err(|why| PlotError { file: file.clone(), why })?;
        written.push(file);
    }
    Ok(written)
}
