//! PyO3 boundary (filled in later).
