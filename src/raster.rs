//! Charts as PNG beside their SVG (`loss.png`, `eval.png`), for viewers that show no SVG:
//! the SVG rendered by resvg at its own size on white. Text is set in DejaVu Sans, compiled in
//! (the `dejavu` crate), so a PNG has its labels and looks the same on every machine, with or
//! without system fonts.

use anyhow::{anyhow, Result};
use resvg::usvg::fontdb::{Database, Source};
use resvg::{tiny_skia, usvg};
use std::path::Path;
use std::sync::{Arc, OnceLock};

use crate::fsutil::write_atomic;

/// The one font family charts are drawn with.
const FAMILY: &str = "DejaVu Sans";

/// DejaVu Sans for every generic family (the charts ask for `sans-serif`).
fn fonts() -> Arc<Database> {
    static FONTS: OnceLock<Arc<Database>> = OnceLock::new();
    FONTS
        .get_or_init(|| {
            let mut db = Database::new();
            db.load_font_source(Source::Binary(Arc::new(dejavu::sans::regular())));
            db.set_sans_serif_family(FAMILY);
            db.set_serif_family(FAMILY);
            db.set_monospace_family(FAMILY);
            db.set_cursive_family(FAMILY);
            db.set_fantasy_family(FAMILY);
            Arc::new(db)
        })
        .clone()
}

/// `svg` as PNG bytes.
pub fn png(svg: &str) -> Result<Vec<u8>> {
    let options = usvg::Options {
        font_family: FAMILY.to_string(),
        fontdb: fonts(),
        ..Default::default()
    };
    let tree = usvg::Tree::from_str(svg, &options)
        .map_err(|e| anyhow!("cannot read the chart's SVG: {e}"))?;
    let size = tree.size().to_int_size();
    let mut pixmap = tiny_skia::Pixmap::new(size.width(), size.height())
        .ok_or_else(|| anyhow!("the chart has no area ({size:?})"))?;
    pixmap.fill(tiny_skia::Color::WHITE);
    resvg::render(&tree, tiny_skia::Transform::default(), &mut pixmap.as_mut());
    pixmap
        .encode_png()
        .map_err(|e| anyhow!("cannot encode the chart as PNG: {e}"))
}

/// Writes `svg` as a PNG file at `path`.
pub fn write_png(svg: &str, path: &Path) -> Result<()> {
    write_atomic(path, &png(svg)?)
}
