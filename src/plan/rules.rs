//! llama.cpp's tensor placement rules: `-ot, --override-tensor REGEX=BUFFER,...` parsed as common/arg.cpp does (the
//! value split at every `,`, each item at its first `=`; several `-ot` add up), and the rules `--cpu-moe` and
//! `--n-cpu-moe N` add (common.h's `LLM_FFN_EXPS_REGEX`). A rule's pattern is searched anywhere in a tensor's name
//! (`std::regex_search`), and the first rule that matches a tensor decides its buffer. The buffer names are checked
//! against the devices when the placement is planned (`super::devices`), as `--rpc` may add devices.
//!
//! The pattern is Rust's `regex` syntax, which agrees with the ECMAScript syntax of `std::regex` on what placement
//! patterns use (classes, groups, alternation, repetition, escapes); look-around and back-references are refused.

use std::fmt;

use regex::Regex;

/// The routed experts' tensors of any layer (llama.cpp's `LLM_FFN_EXPS_REGEX`; ferrite's are
/// `ffn_{gate,up,down}_exps`).
pub const FFN_EXPS_REGEX: &str = r"\.ffn_(up|down|gate|gate_up)_(ch|)exps";

/// The buffer type name of the CPU (ggml's CPU device's default buffer type).
pub const CPU_BUFFER: &str = "CPU";

/// Which flag a rule came from, for the plan table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RuleSource {
    /// `-ot REGEX=BUFFER`.
    OverrideTensor,
    /// `--cpu-moe`.
    CpuMoe,
    /// `--n-cpu-moe N`.
    NCpuMoe(u32),
}

/// One placement rule: tensors whose name contains a match of `pattern` go to the buffer type `buffer`.
#[derive(Clone, Debug)]
pub struct TensorRule {
    pub pattern: String,
    pub buffer: String,
    pub source: RuleSource,
    regex: Regex,
}

impl PartialEq for TensorRule {
    fn eq(&self, other: &Self) -> bool {
        (&self.pattern, &self.buffer, self.source) == (&other.pattern, &other.buffer, other.source)
    }
}

impl TensorRule {
    pub fn new(pattern: &str, buffer: &str, source: RuleSource) -> Result<TensorRule, RuleError> {
        // The regex crate's message draws the pattern with a caret over several lines; its last line says what.
        let regex = Regex::new(pattern).map_err(|e| RuleError::BadRegex {
            pattern: pattern.to_string(),
            message: e
                .to_string()
                .lines()
                .last()
                .unwrap_or_default()
                .trim_start_matches("error: ")
                .to_string(),
        })?;
        Ok(TensorRule {
            pattern: pattern.to_string(),
            buffer: buffer.to_string(),
            source,
            regex,
        })
    }

    /// Whether the rule applies to the tensor `name` (a match anywhere in it, as `std::regex_search`).
    pub fn matches(&self, name: &str) -> bool {
        self.regex.is_match(name)
    }
}

/// The flag as the user would write it: `-ot 'PATTERN=BUFFER'`, `--cpu-moe`, `--n-cpu-moe N`.
impl fmt::Display for TensorRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.source {
            RuleSource::OverrideTensor => write!(f, "-ot {}={}", self.pattern, self.buffer),
            RuleSource::CpuMoe => f.write_str("--cpu-moe"),
            RuleSource::NCpuMoe(n) => write!(f, "--n-cpu-moe {n}"),
        }
    }
}

/// Why an `-ot` value was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RuleError {
    #[error("{item:?} has no '=': each item of -ot is PATTERN=BUFFER (e.g. exps=CPU, or 'blk\\.(1[0-9])\\.ffn_.*_exps=CUDA0'); items are separated by ','")]
    MissingEquals { item: String },
    #[error("{item:?} names no buffer type after '=' (e.g. CPU, CUDA0; `--list-devices` shows the devices)")]
    EmptyBuffer { item: String },
    #[error("{pattern:?} is not a valid regular expression: {message} (Rust regex syntax: no look-around or back-references)")]
    BadRegex { pattern: String, message: String },
}

/// Parses one `-ot` value: `PATTERN=BUFFER[,PATTERN=BUFFER...]`, in order.
pub fn parse_override_tensor(value: &str) -> Result<Vec<TensorRule>, RuleError> {
    value
        .split(',')
        .map(|item| {
            let (pattern, buffer) =
                item.split_once('=')
                    .ok_or_else(|| RuleError::MissingEquals {
                        item: item.to_string(),
                    })?;
            if buffer.is_empty() {
                return Err(RuleError::EmptyBuffer {
                    item: item.to_string(),
                });
            }
            TensorRule::new(pattern, buffer, RuleSource::OverrideTensor)
        })
        .collect()
}

/// `--cpu-moe`: every layer's routed experts on the CPU.
pub fn cpu_moe_rules() -> Vec<TensorRule> {
    vec![TensorRule::new(FFN_EXPS_REGEX, CPU_BUFFER, RuleSource::CpuMoe).expect("a valid regex")]
}

/// `--n-cpu-moe N`: the routed experts of layers `0..N` on the CPU, one rule per layer (as llama.cpp).
pub fn n_cpu_moe_rules(n: u32) -> Vec<TensorRule> {
    (0..n)
        .map(|il| {
            let pattern = format!(r"blk\.{il}{FFN_EXPS_REGEX}");
            TensorRule::new(&pattern, CPU_BUFFER, RuleSource::NCpuMoe(n)).expect("a valid regex")
        })
        .collect()
}

/// The rules of `-ot` (in order), then `--n-cpu-moe`, then `--cpu-moe`: the first that matches a tensor decides.
/// (llama.cpp keeps the command line's order across the three flags; ferrite tries `-ot` first, so an explicit
/// `-ot` always wins over the two shorthands.)
pub fn placement_rules(
    override_tensor: &[TensorRule],
    n_cpu_moe: Option<u32>,
    cpu_moe: bool,
) -> Vec<TensorRule> {
    let mut rules = override_tensor.to_vec();
    rules.extend(n_cpu_moe.map(n_cpu_moe_rules).unwrap_or_default());
    if cpu_moe {
        rules.extend(cpu_moe_rules());
    }
    rules
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn override_tensor_syntax() {
        let rules = parse_override_tensor(r"exps=CPU,blk\.(1[0-9])\.ffn_.*_exps=CUDA0").unwrap();
        assert_eq!(rules.len(), 2);
        assert_eq!(
            (rules[0].pattern.as_str(), rules[0].buffer.as_str()),
            ("exps", "CPU")
        );
        assert_eq!(rules[1].pattern, r"blk\.(1[0-9])\.ffn_.*_exps");
        assert_eq!(rules[1].buffer, "CUDA0");
        assert!(rules[0].matches("blk.3.ffn_up_exps.weight"));
        assert!(!rules[0].matches("blk.3.ffn_up_shexp.weight"));
        assert!(rules[1].matches("blk.12.ffn_down_exps.weight"));
        assert!(!rules[1].matches("blk.2.ffn_down_exps.weight"));
        assert!(!rules[1].matches("blk.12.attn_q_a.weight"));
        // The first '=' splits: the buffer may contain one (RPC names do not, but the split is llama.cpp's).
        let r = parse_override_tensor("a=RPC0[127.0.0.1:50052]").unwrap();
        assert_eq!(r[0].buffer, "RPC0[127.0.0.1:50052]");
        assert_eq!(r[0].to_string(), "-ot a=RPC0[127.0.0.1:50052]");
        // An empty pattern matches every tensor, as std::regex("") does.
        assert!(parse_override_tensor("=CPU").unwrap()[0].matches("token_embd.weight"));
    }

    #[test]
    fn override_tensor_errors() {
        assert_eq!(
            parse_override_tensor("exps"),
            Err(RuleError::MissingEquals {
                item: "exps".into()
            })
        );
        // A trailing ',' leaves an empty item, refused like llama.cpp's "invalid value".
        assert!(matches!(
            parse_override_tensor("exps=CPU,"),
            Err(RuleError::MissingEquals { item }) if item.is_empty()
        ));
        assert_eq!(
            parse_override_tensor("exps="),
            Err(RuleError::EmptyBuffer {
                item: "exps=".into()
            })
        );
        let bad = parse_override_tensor("blk\\.(1[0-9]=CPU").unwrap_err();
        assert!(matches!(&bad, RuleError::BadRegex { pattern, .. } if pattern == "blk\\.(1[0-9]"));
        assert_eq!(
            bad.to_string(),
            r#""blk\\.(1[0-9]" is not a valid regular expression: unclosed group (Rust regex syntax: no look-around or back-references)"#
        );
        assert!(parse_override_tensor("(?=exps)=CPU").is_err());
        let msg = parse_override_tensor("exps").unwrap_err().to_string();
        assert!(msg.contains("PATTERN=BUFFER"), "{msg}");
    }

    #[test]
    fn moe_shorthands_are_llama_cpp_regexes() {
        let all = cpu_moe_rules();
        assert_eq!(all[0].pattern, r"\.ffn_(up|down|gate|gate_up)_(ch|)exps");
        for name in [
            "blk.0.ffn_gate_exps.weight",
            "blk.42.ffn_up_exps.weight",
            "blk.7.ffn_down_exps.weight",
        ] {
            assert!(all[0].matches(name), "{name}");
        }
        assert!(!all[0].matches("blk.0.ffn_gate_shexp.weight"));
        assert!(!all[0].matches("blk.0.ffn_gate_inp.weight"));
        let first2 = n_cpu_moe_rules(2);
        assert_eq!(first2.len(), 2);
        assert_eq!(
            first2[1].pattern,
            r"blk\.1\.ffn_(up|down|gate|gate_up)_(ch|)exps"
        );
        let hit = |name: &str| first2.iter().any(|r| r.matches(name));
        assert!(hit("blk.0.ffn_up_exps.weight") && hit("blk.1.ffn_down_exps.weight"));
        // `blk\.1\.` does not match layer 11 or 21.
        assert!(!hit("blk.11.ffn_up_exps.weight") && !hit("blk.21.ffn_up_exps.weight"));
        assert!(!hit("blk.2.ffn_up_exps.weight"));
        assert!(n_cpu_moe_rules(0).is_empty());
        assert_eq!(first2[0].to_string(), "--n-cpu-moe 2");
        assert_eq!(all[0].to_string(), "--cpu-moe");
        let ot = parse_override_tensor("blk\\.5\\.=CUDA0").unwrap();
        let order = placement_rules(&ot, Some(1), true);
        let sources: Vec<RuleSource> = order.iter().map(|r| r.source).collect();
        assert_eq!(
            sources,
            [
                RuleSource::OverrideTensor,
                RuleSource::NCpuMoe(1),
                RuleSource::CpuMoe
            ]
        );
    }
}
