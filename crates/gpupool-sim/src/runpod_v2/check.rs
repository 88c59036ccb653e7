//! Request-body validation against the REST v2 contract: every problem is collected as one
//! line of the answer's `errors` (`$.gpu: additional properties 'bogus' not allowed`, the
//! document's own example wording), and any problem makes the request a 422.
//!
//! Only the shape is checked here (types, required and unknown fields, ranges, enums,
//! patterns); the rules across fields that RunPod answers with 400 live with the handlers.

use serde_json::{Map, Value};

/// The problems found so far.
#[derive(Debug, Default)]
pub struct Check {
    pub errors: Vec<String>,
}

/// `$.a.b` for member `key` of the value at `at`.
pub fn at(parent: &str, key: &str) -> String {
    format!("{parent}.{key}")
}

/// Whether `s` is a `major.minor` version (`^\d+\.\d+$`).
pub fn is_version(s: &str) -> bool {
    s.split_once('.').is_some_and(|(a, b)| {
        !a.is_empty()
            && !b.is_empty()
            && a.bytes().all(|c| c.is_ascii_digit())
            && b.bytes().all(|c| c.is_ascii_digit())
    })
}

impl Check {
    pub fn fail(&mut self, at: &str, what: impl std::fmt::Display) {
        self.errors.push(format!("{at}: {what}"));
    }

    pub fn is_ok(&self) -> bool {
        self.errors.is_empty()
    }

    /// An object whose members are all `allowed` and that has every one of `required`.
    pub fn object<'a>(
        &mut self,
        at: &str,
        v: &'a Value,
        allowed: &[&str],
        required: &[&str],
    ) -> Option<&'a Map<String, Value>> {
        let Some(m) = v.as_object() else {
            self.fail(at, "expected object");
            return None;
        };
        for k in m.keys().filter(|k| !allowed.contains(&k.as_str())) {
            self.fail(at, format!("additional properties '{k}' not allowed"));
        }
        for r in required.iter().filter(|r| !m.contains_key(**r)) {
            self.fail(at, format!("missing property '{r}'"));
        }
        Some(m)
    }

    pub fn string(&mut self, at: &str, v: &Value, min_len: usize) -> Option<String> {
        match v.as_str() {
            Some(s) if s.chars().count() >= min_len => Some(s.to_string()),
            Some(_) => {
                self.fail(at, format!("length must be >= {min_len}"));
                None
            }
            None => {
                self.fail(at, "expected string");
                None
            }
        }
    }

    /// An integer in `min..=max` (JSON numbers with a fraction are not integers).
    pub fn integer(&mut self, at: &str, v: &Value, min: i64, max: Option<i64>) -> Option<i64> {
        let Some(n) = v.as_i64() else {
            self.fail(at, "expected integer");
            return None;
        };
        if n < min {
            self.fail(at, format!("must be >= {min}"));
            return None;
        }
        if let Some(max) = max.filter(|m| n > *m) {
            self.fail(at, format!("must be <= {max}"));
            return None;
        }
        Some(n)
    }

    pub fn number(&mut self, at: &str, v: &Value, min: f64) -> Option<f64> {
        let Some(n) = v.as_f64() else {
            self.fail(at, "expected number");
            return None;
        };
        if n < min {
            self.fail(at, format!("must be >= {min}"));
            return None;
        }
        Some(n)
    }

    pub fn boolean(&mut self, at: &str, v: &Value) -> Option<bool> {
        let b = v.as_bool();
        if b.is_none() {
            self.fail(at, "expected boolean");
        }
        b
    }

    /// One of the enum's values.
    pub fn one_of(&mut self, at: &str, v: &Value, values: &[&str]) -> Option<String> {
        match v.as_str() {
            Some(s) if values.contains(&s) => Some(s.to_string()),
            _ => {
                self.fail(at, format!("value must be one of {}", values.join(", ")));
                None
            }
        }
    }

    pub fn strings(&mut self, at: &str, v: &Value) -> Option<Vec<String>> {
        let Some(items) = v.as_array() else {
            self.fail(at, "expected array");
            return None;
        };
        let mut out = Vec::new();
        for (n, item) in items.iter().enumerate() {
            out.push(self.string(&format!("{at}[{n}]"), item, 0)?);
        }
        Some(out)
    }

    /// A list of `major.minor` versions.
    pub fn versions(&mut self, at: &str, v: &Value) -> Option<Vec<String>> {
        let list = self.strings(at, v)?;
        for (n, s) in list.iter().enumerate() {
            if !is_version(s) {
                self.fail(
                    &format!("{at}[{n}]"),
                    "does not match pattern ^\\d+\\.\\d+$",
                );
            }
        }
        Some(list)
    }

    /// An object of strings (`env`), in the order given.
    pub fn string_map(&mut self, at: &str, v: &Value) -> Option<Vec<(String, String)>> {
        let Some(m) = v.as_object() else {
            self.fail(at, "expected object");
            return None;
        };
        let mut out = Vec::new();
        for (k, v) in m {
            out.push((k.clone(), self.string(&self::at(at, k), v, 0)?));
        }
        Some(out)
    }

    /// `registry`: a string or null.
    pub fn nullable_string(&mut self, at: &str, v: &Value) -> Option<Value> {
        if v.is_null() || v.is_string() {
            Some(v.clone())
        } else {
            self.fail(at, "expected string or null");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn unknown_and_missing_members_are_named_with_their_path() {
        let mut c = Check::default();
        let v = json!({"name": "x", "bogus": 1});
        c.object("$", &v, &["name"], &["name", "image"]);
        assert_eq!(
            c.errors,
            [
                "$: additional properties 'bogus' not allowed",
                "$: missing property 'image'"
            ]
        );
    }

    #[test]
    fn scalars_are_checked_for_type_and_range() {
        let mut c = Check::default();
        assert_eq!(c.integer("$.n", &json!(3), 1, Some(5)), Some(3));
        assert_eq!(c.integer("$.n", &json!(1.5), 1, None), None);
        assert_eq!(c.integer("$.n", &json!(0), 1, None), None);
        assert_eq!(
            c.one_of("$.c", &json!("ALL"), &["SECURE", "COMMUNITY"]),
            None
        );
        assert_eq!(c.string("$.s", &json!(""), 1), None);
        assert_eq!(c.errors.len(), 4);
        assert!(is_version("12.8") && !is_version("12") && !is_version("12.x"));
    }
}
