//! (filled in by the provider-clients work of issue 3)
