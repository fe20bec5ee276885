//! PNG plots drawn by the program (`bench serve`, `bench quality`): plotters
//! on an in-memory bitmap, text rendered from a font compiled into the
//! binary (Noto Sans) by [`PlotCanvas`], so no system font is needed; the
//! file is written whole or not at all.

use std::path::Path;

use crate::files::AtomicFile;

/// Family name the embedded font is registered under.
pub const FONT: &str = "sans-serif";

/// What a drawing step returns.
pub type PlotResult = Result<(), Box<dyn std::error::Error>>;

/// The whole picture to draw on.
pub type Canvas<'a> = plotters::drawing::DrawingArea<PlotCanvas<'a>, plotters::coord::Shift>;

/// Draws a white picture of `size` pixels with `draw` and writes it to
/// `path` as PNG; errors are the reason, in words.
pub fn render_png(
    path: &Path,
    (width, height): (u32, u32),
    draw: impl FnOnce(&Canvas<'_>) -> PlotResult,
) -> Result<(), String> {
    use plotters::prelude::*;
    // Plotters sizes legend boxes from its registered font; the canvas draws
    // and measures every other text from the same bytes.
    for family in [FONT, "serif", "monospace"] {
        plotters::style::register_font(family, FontStyle::Normal, ttf_noto_sans::REGULAR)
            .map_err(|_| "the embedded font cannot be read".to_string())?;
    }
    let font = ab_glyph::FontRef::try_from_slice(ttf_noto_sans::REGULAR)
        .map_err(|e| format!("the embedded font cannot be read: {e}"))?;
    let mut pixels = vec![255u8; width as usize * height as usize * 3];
    {
        let root = PlotCanvas {
            inner: BitMapBackend::with_buffer(&mut pixels, (width, height)),
            font,
        }
        .into_drawing_area();
        root.fill(&WHITE).map_err(|e| e.to_string())?;
        draw(&root).map_err(|e| e.to_string())?;
        root.present().map_err(|e| e.to_string())?;
    }
    let mut out = AtomicFile::create(path).map_err(|e| e.to_string())?;
    let mut encoder = png::Encoder::new(out.file(), width, height);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    let mut writer = encoder.write_header().map_err(|e| e.to_string())?;
    writer
        .write_image_data(&pixels)
        .map_err(|e| e.to_string())?;
    writer.finish().map_err(|e| e.to_string())?;
    out.commit().map_err(|e| e.to_string())
}

/// A bitmap canvas that draws text itself with ab_glyph, each glyph at its
/// true position (bearing and kerning included) and rotated as asked, instead
/// of through plotters' own font path, which misplaces glyphs; everything
/// else goes to the wrapped [`BitMapBackend`](plotters::backend::BitMapBackend).
pub struct PlotCanvas<'a> {
    inner: plotters::backend::BitMapBackend<'a>,
    font: ab_glyph::FontRef<'static>,
}

/// Error type of the canvas's drawing calls.
type CanvasError<'a> = plotters_backend::DrawingErrorKind<
    <plotters::backend::BitMapBackend<'a> as plotters_backend::DrawingBackend>::ErrorType,
>;

impl PlotCanvas<'_> {
    /// Glyphs of `text` on a baseline at y = 0 from x = 0, and the line's
    /// width, ascent and descent (negative), for a font `size` pixels high.
    fn layout(&self, text: &str, size: f64) -> (Vec<ab_glyph::Glyph>, f32, f32, f32) {
        use ab_glyph::{Font as _, ScaleFont as _};
        let scaled = self.font.as_scaled(size as f32);
        let mut caret = 0.0f32;
        let mut previous = None;
        let mut glyphs = Vec::with_capacity(text.len());
        for c in text.chars() {
            let mut glyph = scaled.scaled_glyph(c);
            if let Some(previous) = previous {
                caret += scaled.kern(previous, glyph.id);
            }
            glyph.position = ab_glyph::point(caret, 0.0);
            caret += scaled.h_advance(glyph.id);
            previous = Some(glyph.id);
            glyphs.push(glyph);
        }
        (glyphs, caret, scaled.ascent(), scaled.descent())
    }
}

impl<'a> plotters_backend::DrawingBackend for PlotCanvas<'a> {
    type ErrorType =
        <plotters::backend::BitMapBackend<'a> as plotters_backend::DrawingBackend>::ErrorType;

    fn get_size(&self) -> (u32, u32) {
        self.inner.get_size()
    }

    fn ensure_prepared(&mut self) -> Result<(), CanvasError<'a>> {
        self.inner.ensure_prepared()
    }

    fn present(&mut self) -> Result<(), CanvasError<'a>> {
        self.inner.present()
    }

    fn draw_pixel(
        &mut self,
        point: plotters_backend::BackendCoord,
        color: plotters_backend::BackendColor,
    ) -> Result<(), CanvasError<'a>> {
        self.inner.draw_pixel(point, color)
    }

    fn draw_line<S: plotters_backend::BackendStyle>(
        &mut self,
        from: plotters_backend::BackendCoord,
        to: plotters_backend::BackendCoord,
        style: &S,
    ) -> Result<(), CanvasError<'a>> {
        self.inner.draw_line(from, to, style)
    }

    fn draw_rect<S: plotters_backend::BackendStyle>(
        &mut self,
        upper_left: plotters_backend::BackendCoord,
        bottom_right: plotters_backend::BackendCoord,
        style: &S,
        fill: bool,
    ) -> Result<(), CanvasError<'a>> {
        self.inner.draw_rect(upper_left, bottom_right, style, fill)
    }

    fn blit_bitmap(
        &mut self,
        pos: plotters_backend::BackendCoord,
        size: (u32, u32),
        src: &[u8],
    ) -> Result<(), CanvasError<'a>> {
        self.inner.blit_bitmap(pos, size, src)
    }

    fn estimate_text_size<T: plotters_backend::BackendTextStyle>(
        &self,
        text: &str,
        style: &T,
    ) -> Result<(u32, u32), CanvasError<'a>> {
        let (_, width, ascent, descent) = self.layout(text, style.size());
        Ok((width.ceil() as u32, (ascent - descent).ceil() as u32))
    }

    fn draw_text<T: plotters_backend::BackendTextStyle>(
        &mut self,
        text: &str,
        style: &T,
        pos: plotters_backend::BackendCoord,
    ) -> Result<(), CanvasError<'a>> {
        use ab_glyph::Font as _;
        use plotters_backend::text_anchor::{HPos, VPos};
        let color = style.color();
        if color.alpha == 0.0 {
            return Ok(());
        }
        let (glyphs, width, ascent, descent) = self.layout(text, style.size());
        let height = ascent - descent;
        // The anchor is placed in the text's own frame, before any rotation.
        let anchor = style.anchor();
        let dx = match anchor.h_pos {
            HPos::Left => 0.0,
            HPos::Center => -width / 2.0,
            HPos::Right => -width,
        };
        let top = match anchor.v_pos {
            VPos::Top => 0.0,
            VPos::Center => -height / 2.0,
            VPos::Bottom => -height,
        };
        let baseline = top + ascent;
        let transform = style.transform();
        let (w, h) = self.get_size();
        let mut coverage = Vec::new();
        for mut glyph in glyphs {
            glyph.position = ab_glyph::point(glyph.position.x + dx, baseline);
            let Some(outline) = self.font.outline_glyph(glyph) else {
                continue; // a space, or a glyph the font lacks
            };
            let bounds = outline.px_bounds();
            let (x0, y0) = (bounds.min.x as i32, bounds.min.y as i32);
            outline.draw(|x, y, c| coverage.push((x0 + x as i32, y0 + y as i32, c)));
        }
        for (x, y, c) in coverage {
            let (x, y) = transform.transform(x, y);
            let (x, y) = (pos.0 + x, pos.1 + y);
            if x >= 0 && y >= 0 && (x as u32) < w && (y as u32) < h && c > 0.0 {
                let alpha = color.alpha * f64::from(c.min(1.0));
                self.inner.draw_pixel(
                    (x, y),
                    plotters_backend::BackendColor {
                        alpha,
                        rgb: color.rgb,
                    },
                )?;
            }
        }
        Ok(())
    }
}
