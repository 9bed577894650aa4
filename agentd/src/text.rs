//! Text helpers the services share.

/// The last `max` bytes of `s` (on a char boundary): what is kept of output, messages and
/// error bodies a sandbox sends, however long they are.
pub fn tail(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut start = s.len() - max;
    while !s.is_char_boundary(start) {
        start += 1;
    }
    s[start..].to_string()
}
