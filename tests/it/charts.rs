//! Charts as PNG: the SVG's size, and text drawn with the compiled-in font whatever fonts the
//! machine has.

use feinschliff::raster;
use resvg::tiny_skia::Pixmap;

/// The number of pixels that are not white in the PNG of a 240×40 SVG with `text` in `family`.
fn ink(text: &str, family: &str) -> usize {
    let svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"240\" height=\"40\"><text x=\"4\" y=\"30\" font-family=\"{family}\" font-size=\"20\">{text}</text></svg>"
    );
    let png = raster::png(&svg).unwrap();
    let pixmap = Pixmap::decode_png(&png).unwrap();
    assert_eq!((pixmap.width(), pixmap.height()), (240, 40));
    pixmap
        .pixels()
        .iter()
        .filter(|p| (p.red(), p.green(), p.blue()) != (255, 255, 255))
        .count()
}

#[test]
fn png_charts_draw_text_with_the_compiled_in_font() {
    assert_eq!(ink("", "sans-serif"), 0, "an empty chart is white");
    let words = ink("Verlust über Schritte", "sans-serif");
    assert!(words > 500, "the text was not drawn: {words} pixels");
    // Every generic family is the compiled-in face, so the charts look the same everywhere.
    assert_eq!(ink("Verlust über Schritte", "monospace"), words);
    assert_eq!(ink("Verlust über Schritte", "serif"), words);
}

#[test]
fn an_svg_that_cannot_be_read_is_an_error() {
    let err = format!("{:#}", raster::png("<svg").unwrap_err());
    assert!(err.contains("cannot read the chart's SVG"), "{err}");
}
