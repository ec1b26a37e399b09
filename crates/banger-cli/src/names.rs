//! Friendly random VM names (`adjective-noun-NNNN`), always valid DNS labels.

use rand::seq::SliceRandom;
use rand::Rng;

const ADJECTIVES: &[&str] = &[
    "amber", "brisk", "calm", "dapper", "eager", "fuzzy", "gentle", "hasty", "icy", "jolly",
    "keen", "lucid", "mellow", "nimble", "odd", "plucky", "quiet", "rapid", "sunny", "tidy",
];
const NOUNS: &[&str] = &[
    "otter", "falcon", "badger", "heron", "lynx", "marten", "newt", "osprey", "panda", "quail",
    "raven", "stoat", "tapir", "urchin", "vole", "walrus", "yak", "zebra", "gecko", "ibis",
];

pub fn random_name() -> String {
    let mut random = rand::thread_rng();
    format!(
        "{}-{}-{:04}",
        ADJECTIVES.choose(&mut random).copied().unwrap_or("quick"),
        NOUNS.choose(&mut random).copied().unwrap_or("vm"),
        random.gen_range(0..10_000)
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn names_are_valid_dns_labels() {
        for _ in 0..1000 {
            let name = super::random_name();
            assert_eq!(banger_proto::validate_vm_name(&name), Ok(()), "{name}");
        }
    }
}
