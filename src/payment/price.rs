//! Prices: a tool's fixed amount, or a CEL expression over its validated arguments clamped to
//! the tool's bounds; and the record a receipt keeps of how a price was reached.
//!
//! Guarantees: an expression is parsed and checked when the catalog is built (evaluated once
//! against a sample of the tool's input schema, which must give an integer), so a typo or a
//! float stops start-up or a reload, naming the tool; at call time a price is an integer number
//! of atomic units in `[min, max]`, or a [`PriceError`] that charges nothing. Money never passes
//! through a float: an expression that gives a double is refused, not rounded.
//! Does not check payments (`verify`) or remember offers (`offer`).

use std::sync::Arc;

use rmcp::model::JsonObject;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

use crate::config::{ChargePolicy, PriceRule, PriceSetting};
use crate::money::UsdcAmount;

/// How a priced tool is priced and charged.
#[derive(Clone)]
pub struct Pricing {
    pub basis: Basis,
    pub charge: ChargePolicy,
    /// `before_run` only: a tool error after settlement is refunded.
    pub refund_on_error: bool,
}

#[derive(Clone)]
pub enum Basis {
    Fixed(UsdcAmount),
    Expression(Arc<PriceExpression>),
}

/// A compiled price expression and its bounds.
pub struct PriceExpression {
    pub source: String,
    program: cel::Program,
    /// The standard environment, built once (building it per call costs more than the call).
    env: Arc<cel::Env>,
    pub min: UsdcAmount,
    pub max: UsdcAmount,
}

/// A price could not be computed for these arguments: the call is refused, uncharged.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the price of `{tool}` could not be computed for these arguments: {reason}")]
pub struct PriceError {
    pub tool: String,
    pub reason: String,
}

/// How a receipt's amount was reached, so a payer can recompute it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PriceRecord {
    /// "fixed", "expression", or "offer" (an earlier offer honoured after a price change).
    pub basis: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expression: Option<String>,
    /// SHA-256 (hex) of the canonical arguments the expression was evaluated on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inputs_sha256: Option<String>,
    /// The expression's value before clamping to the bounds, when it differs from the amount.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub computed: Option<String>,
    /// Unix time until which the honoured offer was valid.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offer_expires: Option<u64>,
}

/// How one paid call is priced and charged: kept on its payment row, written in its receipt.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CallTerms {
    pub charge: ChargePolicy,
    #[serde(default)]
    pub refund_on_error: bool,
    pub price: PriceRecord,
}

/// Today's behaviour: a fixed price, charged before the run.
impl Default for CallTerms {
    fn default() -> Self {
        CallTerms { charge: ChargePolicy::BeforeRun, refund_on_error: false, price: PriceRecord::fixed() }
    }
}

impl CallTerms {
    /// The terms a stored row records (`None` on rows older than them, or damaged).
    pub fn from_stored(json: Option<&str>) -> Option<CallTerms> {
        serde_json::from_str(json?).ok()
    }
}

impl PriceRecord {
    pub fn fixed() -> PriceRecord {
        PriceRecord {
            basis: "fixed".into(),
            expression: None,
            inputs_sha256: None,
            computed: None,
            offer_expires: None,
        }
    }

    pub fn offer(expires: u64) -> PriceRecord {
        PriceRecord { basis: "offer".into(), offer_expires: Some(expires), ..PriceRecord::fixed() }
    }

    /// The tool's `cached_price`: a cached answer was there when the call was quoted.
    pub fn cached() -> PriceRecord {
        PriceRecord { basis: "cached".into(), ..PriceRecord::fixed() }
    }
}

impl Pricing {
    /// The pricing a config setting asks for: `None` for a free tool. `schema` is the tool's
    /// input schema, which an expression is checked against.
    pub fn from_setting(
        setting: &PriceSetting,
        default_charge: ChargePolicy,
        schema: &Map<String, Value>,
    ) -> Result<Option<Pricing>, String> {
        let charge = setting.charge(default_charge);
        let refund_on_error = setting.refund_on_error();
        let basis = match setting {
            PriceSetting::Fixed(amount) if amount.is_zero() => return Ok(None),
            PriceSetting::Fixed(amount) => Basis::Fixed(*amount),
            PriceSetting::Rule(rule) => match UsdcAmount::parse(rule.price.trim()) {
                Ok(amount) if amount.is_zero() => return Ok(None),
                Ok(amount) => Basis::Fixed(amount),
                Err(_) => Basis::Expression(Arc::new(PriceExpression::compile(rule, schema)?)),
            },
        };
        Ok(Some(Pricing { basis, charge, refund_on_error }))
    }

    /// The price of a call with these (schema-valid) arguments, and how it was reached.
    pub fn evaluate(&self, tool: &str, args: &JsonObject) -> Result<(UsdcAmount, PriceRecord), PriceError> {
        match &self.basis {
            Basis::Fixed(amount) => Ok((*amount, PriceRecord::fixed())),
            Basis::Expression(e) => {
                let fail = |reason: String| PriceError { tool: tool.to_owned(), reason };
                let value = e.value(args).map_err(fail)?;
                let amount = e.clamp(value);
                let record = PriceRecord {
                    basis: "expression".into(),
                    expression: Some(e.source.clone()),
                    inputs_sha256: Some(crate::canonical::hash_of(args)),
                    computed: (i128::from(amount.atomic()) != value).then(|| value.to_string()),
                    offer_expires: None,
                };
                Ok((amount, record))
            }
        }
    }

    /// The least a call can cost: the fixed price, or the expression's lower bound.
    pub fn floor(&self) -> UsdcAmount {
        match &self.basis {
            Basis::Fixed(amount) => *amount,
            Basis::Expression(e) => e.min,
        }
    }

    /// What `tools/list` and `/.well-known/x402` add to the price: the policy and, for an
    /// expression, its source and bounds.
    pub fn describe(&self) -> Map<String, Value> {
        let mut out = Map::new();
        out.insert("charge".into(), json!(self.charge.as_str()));
        if self.refund_on_error {
            out.insert("refundOnError".into(), json!(true));
        }
        if let Basis::Expression(e) = &self.basis {
            out.insert("expression".into(), json!(e.source));
            out.insert("minAmount".into(), json!(e.min.to_string()));
            out.insert("maxAmount".into(), json!(e.max.to_string()));
        }
        out
    }
}

impl PriceExpression {
    /// Parses the expression and checks it against the tool's input schema: it is evaluated
    /// once on a sample of the schema, so an unknown name, a misspelt argument, a type error or
    /// a float result is found now, not at a payer's call. (cel-rust has no static type
    /// checker; the sample exercises the same code the calls will.)
    fn compile(rule: &PriceRule, schema: &Map<String, Value>) -> Result<PriceExpression, String> {
        let max = rule.max_price.ok_or_else(|| {
            format!("`{}` is an expression, so max_price is required: the most a call may cost", rule.price)
        })?;
        let min = rule.min_price.unwrap_or(UsdcAmount::from_atomic(1));
        if min.is_zero() || min > max {
            return Err(format!("min_price ({min}) must be at least 1 and at most max_price ({max})"));
        }
        let env = Arc::new(cel::Env::stdlib());
        let program =
            env.compile(&rule.price).map_err(|e| format!("`{}` does not parse: {e}", rule.price))?;
        let expression = PriceExpression { source: rule.price.clone(), program, env, min, max };
        let sample = match sample_of(&Value::Object(schema.clone())) {
            Value::Object(sample) => sample,
            _ => Map::new(),
        };
        expression
            .value(&sample)
            .map_err(|e| format!("`{}` on sample arguments {}: {e}", rule.price, Value::Object(sample)))?;
        Ok(expression)
    }

    /// The expression's integer value for `args`.
    fn value(&self, args: &JsonObject) -> Result<i128, String> {
        let mut context = cel::Context::with_env(self.env.clone());
        context.add_variable_from_value("args", cel_args(args));
        match self.program.execute(&context) {
            Ok(cel::Value::Int(n)) => Ok(i128::from(n)),
            Ok(cel::Value::UInt(n)) => Ok(i128::from(n)),
            Ok(cel::Value::Float(_)) => {
                Err("it gives a double; money is whole atomic units, so wrap it in int(...)".into())
            }
            Ok(other) => Err(format!("it gives {:?}, not an integer", other.type_of())),
            Err(e) => Err(e.to_string()),
        }
    }

    fn clamp(&self, value: i128) -> UsdcAmount {
        let clamped = value.clamp(i128::from(self.min.atomic()), i128::from(self.max.atomic()));
        UsdcAmount::from_atomic(clamped as u64)
    }
}

/// Arguments as CEL sees them. Written here because `cel::to_value` makes every non-negative
/// JSON integer a `uint`, and CEL refuses `uint * int`: `args.limit * 500` would fail. A JSON
/// integer is an `int` here, as JSON-schema integers are in Kubernetes' CEL (a `uint` only past
/// i64); fractions are `double`s.
fn cel_args(args: &JsonObject) -> cel::Value {
    fn convert(v: &Value) -> cel::Value {
        match v {
            Value::Null => cel::Value::Null,
            Value::Bool(b) => cel::Value::Bool(*b),
            Value::Number(n) => match (n.as_i64(), n.as_u64()) {
                (Some(i), _) => cel::Value::Int(i),
                (None, Some(u)) => cel::Value::UInt(u),
                _ => cel::Value::Float(n.as_f64().unwrap_or(f64::NAN)),
            },
            Value::String(s) => cel::Value::from(s.as_str()),
            Value::Array(items) => cel::Value::from(items.iter().map(convert).collect::<Vec<_>>()),
            Value::Object(map) => object(map),
        }
    }
    fn object(map: &JsonObject) -> cel::Value {
        let fields: std::collections::HashMap<String, cel::Value> =
            map.iter().map(|(k, v)| (k.clone(), convert(v))).collect();
        cel::Value::from(fields)
    }
    object(args)
}

/// A value of every property a JSON schema describes: `enum`/`const`/`default` when given, else
/// a plain member of its type (integers at their minimum or 1, so a divisor is not zero).
fn sample_of(schema: &Value) -> Value {
    if let Some(v) = schema.get("const").or_else(|| schema.get("default")) {
        return v.clone();
    }
    if let Some(first) = schema.get("enum").and_then(Value::as_array).and_then(|e| e.first()) {
        return first.clone();
    }
    let kind = match schema.get("type") {
        Some(Value::Array(kinds)) => kinds.iter().filter_map(Value::as_str).find(|k| *k != "null"),
        Some(Value::String(kind)) => Some(kind.as_str()),
        _ => schema.get("properties").map(|_| "object"),
    };
    match kind {
        Some("object") => {
            let properties = schema.get("properties").and_then(Value::as_object);
            let fields = properties.into_iter().flatten().map(|(k, s)| (k.clone(), sample_of(s)));
            Value::Object(fields.collect())
        }
        Some("array") => Value::Array(schema.get("items").map(sample_of).into_iter().collect()),
        Some("string") => json!("x"),
        Some("integer") => schema.get("minimum").cloned().filter(Value::is_i64).unwrap_or(json!(1)),
        Some("number") => json!(1.0),
        Some("boolean") => json!(false),
        _ => Value::Null,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(price: &str, min: Option<u64>, max: Option<u64>) -> PriceSetting {
        PriceSetting::Rule(PriceRule {
            price: price.into(),
            min_price: min.map(UsdcAmount::from_atomic),
            max_price: max.map(UsdcAmount::from_atomic),
            charge: None,
            refund_on_error: false,
        })
    }

    fn schema() -> Map<String, Value> {
        let s = json!({
            "type": "object",
            "properties": { "text": { "type": "string" }, "limit": { "type": "integer", "minimum": 1 } },
            "required": ["text"]
        });
        s.as_object().unwrap().clone()
    }

    fn args(v: Value) -> JsonObject {
        v.as_object().unwrap().clone()
    }

    fn price(expr: &str, min: Option<u64>, max: u64, a: Value) -> Result<u64, PriceError> {
        let p = Pricing::from_setting(&rule(expr, min, Some(max)), ChargePolicy::BeforeRun, &schema())
            .unwrap()
            .unwrap();
        p.evaluate("t", &args(a)).map(|(amount, _)| amount.atomic())
    }

    #[test]
    fn an_expression_prices_the_arguments_and_is_clamped_to_its_bounds() {
        let expr = "1000 + 2 * size(args.text)";
        assert_eq!(price(expr, None, 100_000, json!({"text": "hello"})).unwrap(), 1010);
        assert_eq!(price(expr, None, 1005, json!({"text": "hello"})).unwrap(), 1005, "clamped to max");
        assert_eq!(
            price("args.limit * 500", Some(700), 10_000, json!({"text": "", "limit": 1})).unwrap(),
            700
        );
        assert_eq!(price("args.limit * 500", None, 10_000, json!({"text": "", "limit": 3})).unwrap(), 1500);
        assert_eq!(price("0 - 5", Some(10), 100, json!({"text": ""})).unwrap(), 10, "negative → min");
    }

    #[test]
    fn the_receipt_record_names_the_expression_its_inputs_and_the_unclamped_value() {
        let p = Pricing::from_setting(
            &rule("args.limit * 500", None, Some(1000)),
            ChargePolicy::OnSuccess,
            &schema(),
        )
        .unwrap()
        .unwrap();
        let a = args(json!({"text": "", "limit": 7}));
        let (amount, record) = p.evaluate("t", &a).unwrap();
        assert_eq!(amount.atomic(), 1000);
        assert_eq!(record.basis, "expression");
        assert_eq!(record.expression.as_deref(), Some("args.limit * 500"));
        assert_eq!(record.inputs_sha256, Some(crate::canonical::hash_of(&a)));
        assert_eq!(record.computed.as_deref(), Some("3500"));
    }

    #[test]
    fn bad_expressions_are_refused_when_the_catalog_is_built_naming_the_problem() {
        let check = |expr: &str, max: Option<u64>| {
            Pricing::from_setting(&rule(expr, None, max), ChargePolicy::BeforeRun, &schema()).err().unwrap()
        };
        assert!(check("1000 +", Some(10)).contains("does not parse"));
        assert!(
            check("args.txt * 2", Some(10)).contains("No such key: txt"),
            "{}",
            check("args.txt * 2", Some(10))
        );
        assert!(check("double(size(args.text)) * 1.5", Some(10)).contains("int(...)"));
        assert!(check("size(args.text) * 1.5", Some(10)).contains("Unsupported binary operator"));
        assert!(check("args.text", Some(10)).contains("not an integer"));
        assert!(check("nobody + 1", Some(10)).contains("nobody"));
        assert!(check("size(args.text)", None).contains("max_price is required"));
        let inverted =
            Pricing::from_setting(&rule("1 + 1", Some(50), Some(10)), ChargePolicy::BeforeRun, &schema());
        assert!(inverted.err().unwrap().contains("min_price"));
    }

    #[test]
    fn evaluation_errors_at_call_time_are_price_errors_not_panics() {
        // `limit` is optional: an expression that needs it fails for a call without it.
        let e = price("args.limit * 500", None, 10_000, json!({"text": "x"})).unwrap_err();
        assert!(e.reason.contains("limit"), "{e}");
        // Integer overflow is an error, never a wrapped (cheap) price.
        let e = price("args.limit * 9223372036854775807", None, 10_000, json!({"text": "", "limit": 3}))
            .unwrap_err();
        assert!(!e.reason.is_empty());
    }

    #[test]
    fn fixed_and_zero_prices() {
        let s = schema();
        let free = Pricing::from_setting(&PriceSetting::Fixed(UsdcAmount::ZERO), ChargePolicy::BeforeRun, &s);
        assert!(free.unwrap().is_none());
        let fixed =
            Pricing::from_setting(&rule("2500", None, None), ChargePolicy::BeforeRun, &s).unwrap().unwrap();
        assert_eq!(
            fixed.evaluate("t", &Map::new()).unwrap(),
            (UsdcAmount::from_atomic(2500), PriceRecord::fixed())
        );
    }
}
