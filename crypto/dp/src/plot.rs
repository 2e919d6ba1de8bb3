//! SVG plot of accuracy vs ε (plotters, SVG backend only).

use crate::error::{DpError, Result};
use crate::utility::CurvePoint;
use plotters::prelude::*;
use std::path::Path;

fn perr(e: impl std::fmt::Display) -> DpError {
    DpError::Plot(e.to_string())
}

/// Writes an SVG with one line per series: x = log2 ε over the finite points, and a dashed
/// horizontal line at each series' ε = ∞ accuracy.
pub fn write_svg(path: &Path, title: &str, series: &[(String, Vec<CurvePoint>)]) -> Result<()> {
    let root = SVGBackend::new(path, (800, 500)).into_drawing_area();
    root.fill(&WHITE).map_err(perr)?;
    let xs: Vec<f64> = series
        .iter()
        .flat_map(|(_, pts)| pts.iter().filter_map(|p| p.epsilon))
        .map(f64::log2)
        .collect();
    let (xmin, xmax) = xs
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &x| {
            (a.min(x), b.max(x))
        });
    let (xmin, xmax) = if xmin.is_finite() {
        (xmin - 0.2, xmax + 0.2)
    } else {
        (-1.0, 4.0)
    };
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(55)
        .build_cartesian_2d(xmin..xmax, 0.0f64..1.0f64)
        .map_err(perr)?;
    chart
        .configure_mesh()
        .x_desc("log2 ε  (δ = 1e-5 per released vector; dashed: no noise)")
        .y_desc("test accuracy")
        .draw()
        .map_err(perr)?;
    for (i, (name, pts)) in series.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        let line: Vec<(f64, f64)> = pts
            .iter()
            .filter_map(|p| p.epsilon.map(|e| (e.log2(), p.accuracy)))
            .collect();
        chart
            .draw_series(LineSeries::new(line.clone(), color.stroke_width(2)))
            .map_err(perr)?
            .label(name.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
        chart
            .draw_series(
                line.iter()
                    .map(|&(x, y)| Circle::new((x, y), 3, color.filled())),
            )
            .map_err(perr)?;
        if let Some(inf) = pts.iter().find(|p| p.epsilon.is_none()) {
            chart
                .draw_series(DashedLineSeries::new(
                    vec![(xmin, inf.accuracy), (xmax, inf.accuracy)],
                    6,
                    4,
                    color.stroke_width(1),
                ))
                .map_err(perr)?;
        }
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(SeriesLabelPosition::LowerRight)
        .draw()
        .map_err(perr)?;
    root.present().map_err(perr)?;
    Ok(())
}
