//! Money on the wire: provider prices as floats, and the CRD's price strings.

use crate::provider::{ProviderError, ProviderResult};

/// Money from a float on the wire, rounded to 6 decimals (the CRD's precision).
pub(crate) fn money(value: f64) -> Option<rust_decimal::Decimal> {
    if !value.is_finite() || value < 0.0 {
        return None;
    }
    rust_decimal::Decimal::try_from(value)
        .ok()
        .map(|d| d.round_dp(6).normalize())
}

/// A price string of the CRD (`"0.25"`), validated as a positive decimal.
pub(crate) fn parse_price(what: &str, raw: &str) -> ProviderResult<rust_decimal::Decimal> {
    let price: rust_decimal::Decimal = raw
        .trim()
        .parse()
        .map_err(|_| ProviderError::Permanent(format!("{what}: {raw:?} is not a decimal")))?;
    if price <= rust_decimal::Decimal::ZERO {
        return Err(ProviderError::Permanent(format!(
            "{what}: must be greater than zero"
        )));
    }
    Ok(price)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn money_rounds_and_refuses_nonsense() {
        assert_eq!(
            money(0.2345678).map(|d| d.to_string()),
            Some("0.234568".into())
        );
        assert_eq!(money(f64::NAN), None);
        assert_eq!(money(-1.0), None);
        assert!(parse_price("p", "0").is_err());
        assert!(parse_price("p", "abc").is_err());
        assert_eq!(
            parse_price("p", "0.25").map(|d| d.to_string()).ok(),
            Some("0.25".into())
        );
    }
}
